//! A unix-socket proxy in front of a real dockerd that, when told to, breaks its answers the
//! ways an engine under stress does: a 500, a body cut off half-way (the connection
//! closed), a body that stops half-way and never ends. Event streams break the same way
//! at their next event. It can also rewrite one kind of answer (a well-formed answer with
//! one object made unreadable), to show that object rejected alone. Between faults it
//! passes bytes through untouched.
use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Answer every request with `500 Internal Server Error`.
    Status500,
    /// Forward the answer's head and half its first body bytes, then close.
    CutBody,
    /// Forward the answer's head and half its first body bytes, then send nothing more
    /// (the connection stays open until the fault is lifted).
    HangBody,
}

/// Answers to requests whose path contains `path` have `from` replaced by `to`.
#[derive(Clone, Debug)]
pub struct Rewrite {
    pub path: String,
    pub from: String,
    pub to: String,
}

struct Conn {
    sock: UnixStream,
    /// An event stream (a rewrite leaves those open).
    stream: AtomicBool,
}

struct Shared {
    upstream: PathBuf,
    fault: Mutex<Fault>,
    rewrite: Mutex<Option<Rewrite>>,
    /// Every client connection, so a change of fault drops them all (pooled connections
    /// would otherwise carry on under the old rule).
    conns: Mutex<Vec<Arc<Conn>>>,
    faulted: AtomicU64,
    stopping: AtomicBool,
}

pub struct FaultProxy {
    pub socket: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `socket`, forwarding to the engine at `upstream`.
    pub fn start(socket: &Path, upstream: &Path) -> Result<FaultProxy> {
        let _ = std::fs::remove_file(socket);
        let listener =
            UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
        let shared = Arc::new(Shared {
            upstream: upstream.into(),
            fault: Mutex::new(Fault::None),
            rewrite: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            faulted: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let Ok(sock) = conn.try_clone() else { continue };
                let c = Arc::new(Conn {
                    sock,
                    stream: AtomicBool::new(false),
                });
                s.conns.lock().unwrap().push(c.clone());
                let s = s.clone();
                std::thread::spawn(move || serve(&s, &c, conn));
            }
        });
        Ok(FaultProxy {
            socket: socket.into(),
            shared,
            accept: Some(accept),
        })
    }

    /// `unix://` URL of the proxy, for `--docker-host`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// From now on, answers break this way; every open connection is dropped.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
        self.drop_conns(true);
    }

    fn drop_conns(&self, streams: bool) {
        self.shared.conns.lock().unwrap().retain(|c| {
            if !streams && c.stream.load(Ordering::SeqCst) {
                return true;
            }
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
            false
        });
    }

    /// From now on, answers are rewritten this way (`None`: no more); every open
    /// connection but the event streams is dropped (so meshd reads the changes it sees
    /// events for, without a fresh start of its streams).
    pub fn rewrite(&self, rewrite: Option<Rewrite>) {
        *self.shared.rewrite.lock().unwrap() = rewrite;
        self.drop_conns(false);
    }

    /// Answers broken (or rewritten) so far.
    pub fn faulted(&self) -> u64 {
        self.shared.faulted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.set(Fault::None);
        // Wakes the accept loop, which then sees `stopping`.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Reads until the end of an HTTP head (`\r\n\r\n`); the head and whatever came after it.
fn read_head(from: &mut UnixStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        let n = from.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve(s: &Shared, conn: &Conn, mut client: UnixStream) {
    // Requests meshd sends are GETs: a head and no body.
    let Some((mut request, rest)) = read_head(&mut client) else {
        return;
    };
    conn.stream.store(is_stream(&request), Ordering::SeqCst);
    let fault = *s.fault.lock().unwrap();
    if fault == Fault::Status500 {
        let body = br#"{"message":"fault injected by the test: 500"}"#;
        let _ = write!(
            client,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = client.write_all(body);
        s.faulted.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let Ok(mut upstream) = UnixStream::connect(&s.upstream) else {
        return;
    };
    let rewrite = s.rewrite.lock().unwrap().clone();
    if let Some(rw) = rewrite.filter(|_| fault == Fault::None && !is_stream(&request)) {
        rewrite_one(s, &rw, client, upstream, request);
        return;
    }
    request.extend_from_slice(&rest);
    if upstream.write_all(&request).is_err() {
        return;
    }
    if fault == Fault::None {
        // Plain bytes both ways for the rest of the connection.
        let (Ok(mut up_read), Ok(mut client_write)) = (upstream.try_clone(), client.try_clone())
        else {
            return;
        };
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_read, &mut client_write);
            let _ = client_write.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut client, &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        return;
    }
    // Cut or hang: the head, then half of the first body bytes (an event stream's come
    // with its next event).
    let Some((head, mut body)) = read_head(&mut upstream) else {
        return;
    };
    if client.write_all(&head).is_err() {
        return;
    }
    if body.is_empty() {
        let mut chunk = [0u8; 8192];
        match upstream.read(&mut chunk) {
            Ok(n) if n > 0 => body.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let half = body.len().div_ceil(2);
    let _ = client.write_all(&body[..half]);
    let _ = client.flush();
    s.faulted.fetch_add(1, Ordering::SeqCst);
    drop(upstream);
    if fault == Fault::HangBody {
        // Nothing more until meshd gives up or the fault is lifted (`set` shuts this
        // connection down, and the read below ends).
        let mut sink = [0u8; 1024];
        while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
}

/// The request's target (`GET /v1.47/services/x HTTP/1.1` → `/v1.47/services/x`).
fn target(request: &[u8]) -> &str {
    std::str::from_utf8(request)
        .ok()
        .and_then(|r| r.split(' ').nth(1))
        .unwrap_or_default()
}

/// Event streams never end: they are passed through, never rewritten.
fn is_stream(request: &[u8]) -> bool {
    target(request).contains("/events")
}

/// One request on its own connection: asked of the engine as HTTP/1.0 (so it answers with
/// a plain body and closes), read whole, rewritten when its path matches, and answered with
/// a length and `Connection: close` (so a pooled connection never carries a later request
/// past this function).
fn rewrite_one(
    s: &Shared,
    rw: &Rewrite,
    mut client: UnixStream,
    mut upstream: UnixStream,
    request: Vec<u8>,
) {
    let text = String::from_utf8_lossy(&request).into_owned();
    let Some((line, headers)) = text.split_once("\r\n") else {
        return;
    };
    let line = line.replacen("HTTP/1.1", "HTTP/1.0", 1);
    let headers: String = headers
        .split("\r\n")
        .filter(|h| !h.is_empty() && !h.to_ascii_lowercase().starts_with("connection:"))
        .map(|h| format!("{h}\r\n"))
        .collect();
    let asked = format!("{line}\r\n{headers}Connection: close\r\n\r\n");
    // An engine that does not close is not waited for for ever.
    let _ = upstream.set_read_timeout(Some(Duration::from_secs(10)));
    if upstream.write_all(asked.as_bytes()).is_err() {
        return;
    }
    let Some((head, mut body)) = read_head(&mut upstream) else {
        return;
    };
    let mut chunk = [0u8; 65536];
    while let Ok(n) = upstream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    if target(&request).contains(&rw.path) {
        let before = String::from_utf8_lossy(&body).into_owned();
        let after = before.replace(&rw.from, &rw.to);
        if after != before {
            s.faulted.fetch_add(1, Ordering::SeqCst);
        }
        body = after.into_bytes();
    }
    let status = head
        .split("\r\n")
        .next()
        .unwrap_or("HTTP/1.1 502 Bad Gateway");
    let status = status.replacen("HTTP/1.0", "HTTP/1.1", 1);
    let _ = write!(
        client,
        "{status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = client.write_all(&body);
    let _ = client.shutdown(std::net::Shutdown::Both);
}

/// A chunked body's bytes (`size\r\ndata\r\n` … `0\r\n\r\n`).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        raw = &raw[eol + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
    out
}
