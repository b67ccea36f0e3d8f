//! Prometheus metrics on `--metrics ADDR` (off by default; loopback addresses only, as
//! every listener of meshd's but the L7 ports is local or authenticated): `GET /metrics` in
//! the Prometheus text format.
//!
//! - `registry`: the metrics, read from what meshd already keeps for `meshctl` at scrape
//!   time, plus the histograms observed as things happen (`Histograms`).
//! - here: the HTTP listener.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

use crate::status::Shared;

pub mod registry;

pub use registry::Histograms;

/// Serves `/metrics` on `addr` until the process ends.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<tokio::task::JoinHandle<()>> {
    check_addr(addr)?;
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("metrics: listen on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    info!(%addr, "metrics: serving /metrics");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "metrics: accept");
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&shared, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

/// Metrics are unauthenticated: loopback only.
pub fn check_addr(addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!(
            "--metrics {addr}: meshd serves metrics on loopback only (they are not \
             authenticated); scrape them on the node (a Prometheus agent, or a proxy with \
             authentication)"
        );
    }
    Ok(())
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header(header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "meshd serves /metrics only\n".into(),
        );
    }
    match registry::scrape(shared) {
        Ok(text) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e:#}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_listen_on_loopback_only() {
        assert!(super::check_addr("127.0.0.1:9478".parse().unwrap()).is_ok());
        assert!(super::check_addr("[::1]:9478".parse().unwrap()).is_ok());
        let e = super::check_addr("0.0.0.0:9478".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("loopback only"), "{e}");
        assert!(super::check_addr("192.168.1.5:9478".parse().unwrap()).is_err());
    }
}
