//! A small tool that lives in the lab image next to busybox, for what busybox lacks here:
//! a UDP server, UDP and peer-address probes, and the benchmark's echo server and clients.
//! std (and rustls, pure Rust) only, so it runs in a bare image with just the C library
//! beside it.
mod ws;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

fn usage() -> ! {
    eprintln!(
        "usage: labtool udp-serve PORT | udp-ask ADDR:PORT [--connected] | peer ADDR:PORT |\n\
         \x20      serve-peer PORT | tcp-read ADDR:PORT |\n\
         \x20      tcp-echo PORT | rr ADDR:PORT SECONDS | crr ADDR:PORT SECONDS |\n\
         \x20      rr-alt|crr-alt SECONDS ADDR:PORT... |\n\
         \x20      http-serve PORT | http-echo PORT |\n\
         \x20      https-echo PORT CERT KEY | http-loop HOST:PORT STOPFILE OUTFILE |\n\
         \x20      ws-serve PORT | ws-ask ADDR:PORT HOST PATH TEXT"
    );
    std::process::exit(2)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["udp-serve", port] => udp_serve(port.parse().unwrap_or_else(|_| usage())),
        ["udp-ask", target, rest @ ..] => udp_ask(addr(target), rest.contains(&"--connected")),
        ["peer", target] => {
            let s = TcpStream::connect_timeout(&addr(target), Duration::from_secs(3))
                .unwrap_or_else(|e| fail(&format!("connect {target}: {e}")));
            println!("{}", s.peer_addr().unwrap());
        }
        ["tcp-echo", port] => tcp_echo(port.parse().unwrap_or_else(|_| usage())),
        ["serve-peer", port] => serve_peer(port.parse().unwrap_or_else(|_| usage())),
        ["tcp-read", target] => {
            let mut s = TcpStream::connect_timeout(&addr(target), Duration::from_secs(3))
                .unwrap_or_else(|e| fail(&format!("connect {target}: {e}")));
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out)
                .unwrap_or_else(|e| fail(&format!("read {target}: {e}")));
            print!("{out}");
        }
        ["rr", target, secs] => rr(addr(target), secs.parse().unwrap_or_else(|_| usage())),
        ["crr", target, secs] => crr(addr(target), secs.parse().unwrap_or_else(|_| usage())),
        [kind @ ("rr-alt" | "crr-alt"), secs, targets @ ..] if !targets.is_empty() => alternate(
            kind.trim_end_matches("-alt"),
            secs.parse().unwrap_or_else(|_| usage()),
            &targets.iter().map(|t| addr(t)).collect::<Vec<_>>(),
        ),
        ["http-serve", port] => http_serve(port.parse().unwrap_or_else(|_| usage())),
        ["http-echo", port] => http_echo(port.parse().unwrap_or_else(|_| usage())),
        ["https-echo", port, cert, key] => {
            https_echo(port.parse().unwrap_or_else(|_| usage()), cert, key)
        }
        ["ws-serve", port] => ws::serve(port.parse().unwrap_or_else(|_| usage()), hostname()),
        ["ws-ask", target, host, path, text] => match ws::ask(addr(target), host, path, text) {
            Ok(answer) => println!("{answer}"),
            Err(e) => fail(&e),
        },
        ["http-loop", target, stop, out] => http_loop(target, stop, out),
        _ => usage(),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("labtool: {msg}");
    std::process::exit(1)
}

/// Answers every datagram with this container's hostname.
/// On TCP and UDP port `port`: answers "<hostname> <peer address:port>" (a TCP connection
/// then closes): what a task behind the ingress mesh sees of its client.
fn serve_peer(port: u16) {
    let udp = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    let name = hostname();
    let n = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{n} {from}").as_bytes(), from);
            }
        }
    });
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    for s in l.incoming().flatten() {
        let mut s = s;
        if let Ok(peer) = s.peer_addr() {
            let _ = s.write_all(format!("{name} {peer}\n").as_bytes());
        }
    }
}

fn udp_serve(port: u16) {
    let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    let name = hostname();
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(name.as_bytes(), from);
        }
    }
}

/// Sends one datagram and prints "<answer> from <source address>": the source must be the
/// address asked, even when a load balancer sent it elsewhere.
fn udp_ask(target: SocketAddr, connected: bool) {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = if connected {
        sock.connect(target)
            .unwrap_or_else(|e| fail(&format!("connect: {e}")));
        sock.send(b"hi")
            .unwrap_or_else(|e| fail(&format!("send: {e}")));
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| fail(&format!("recv: {e}")));
        (n, sock.peer_addr().unwrap())
    } else {
        sock.send_to(b"hi", target)
            .unwrap_or_else(|e| fail(&format!("send: {e}")));
        sock.recv_from(&mut buf)
            .unwrap_or_else(|e| fail(&format!("recv: {e}")))
    };
    println!("{} from {}", String::from_utf8_lossy(&buf[..n]), from);
}

/// Echoes 64-byte requests, one thread per connection; a connection that sends "Q" after
/// connecting gets one reply and is closed by the client.
/// Echoes 64-byte blocks; a block of 64 `?` is answered with this container's hostname
/// instead (space-padded), so a test can ask which task holds a connection.
fn tcp_echo(port: u16) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    let mut name = [b' '; 64];
    let h = hostname();
    let n = h.len().min(64);
    name[..n].copy_from_slice(&h.as_bytes()[..n]);
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() {
                let answer = if buf == [b'?'; 64] { &name } else { &buf };
                if s.write_all(answer).is_err() {
                    break;
                }
            }
        });
    }
}

fn report(kind: &str, lat: Vec<Duration>, elapsed: Duration) {
    println!("{}", summary(kind, lat, elapsed));
}

fn summary(kind: &str, mut lat: Vec<Duration>, elapsed: Duration) -> String {
    lat.sort();
    let q = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
        }
    };
    format!(
        "{{\"kind\":\"{kind}\",\"ops\":{},\"per_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        q(0.5),
        q(0.99)
    )
}

/// rr or crr against several targets in turn, 20 ms each, for `secs` in all: every target
/// sees the machine as loaded as the others (a shared machine's load changes within a
/// second, which separate runs cannot cancel). Prints a JSON array, one entry per target,
/// each timed over its own slices only.
fn alternate(kind: &str, secs: f64, targets: &[SocketAddr]) {
    const SLICE: Duration = Duration::from_millis(20);
    // rr: one connection per target, open before the clock starts.
    let mut conns: Vec<Option<TcpStream>> = targets
        .iter()
        .map(|t| (kind == "rr").then(|| connect(*t)))
        .collect();
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    let mut busy = vec![Duration::ZERO; targets.len()];
    let mut buf = [7u8; 64];
    let start = Instant::now();
    let mut turn = 0;
    while start.elapsed().as_secs_f64() < secs {
        let i = turn % targets.len();
        turn += 1;
        let slice = Instant::now();
        while slice.elapsed() < SLICE {
            let t = Instant::now();
            if let Some(s) = conns[i].as_mut() {
                s.write_all(&buf).unwrap();
                s.read_exact(&mut buf).unwrap();
            } else {
                let mut s = connect(targets[i]);
                s.write_all(&buf).unwrap();
                s.read_exact(&mut buf).unwrap();
            }
            lat[i].push(t.elapsed());
        }
        busy[i] += slice.elapsed();
    }
    let rows: Vec<String> = lat
        .into_iter()
        .zip(busy)
        .map(|(l, b)| summary(kind, l, b))
        .collect();
    println!("[{}]", rows.join(","));
}

fn connect(target: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(target).unwrap_or_else(|e| fail(&format!("connect {target}: {e}")));
    s.set_nodelay(true).unwrap();
    s
}

/// Request/response on one connection for `secs` seconds.
fn rr(target: SocketAddr, secs: f64) {
    let mut s = TcpStream::connect(target).unwrap_or_else(|e| fail(&format!("connect: {e}")));
    s.set_nodelay(true).unwrap();
    let mut buf = [7u8; 64];
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        s.write_all(&buf).unwrap();
        s.read_exact(&mut buf).unwrap();
        lat.push(t.elapsed());
    }
    report("rr", lat, start.elapsed());
}

/// Connect, one request/response, close, for `secs` seconds.
fn crr(target: SocketAddr, secs: f64) {
    let mut buf = [7u8; 64];
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        let mut s = TcpStream::connect(target).unwrap_or_else(|e| fail(&format!("connect: {e}")));
        s.set_nodelay(true).unwrap();
        s.write_all(&buf).unwrap();
        s.read_exact(&mut buf).unwrap();
        drop(s);
        lat.push(t.elapsed());
    }
    report("crr", lat, start.elapsed());
}

static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// An HTTP server that answers "<hostname> ok", or "<hostname> stopping" once it got
/// SIGTERM: it keeps serving through its grace period (as a well-behaved service does), and
/// tells the client that it reached a task that was told to stop.
fn http_serve(port: u16) {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) };
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    let name = hostname();
    for s in l.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut buf);
            let state = if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
                "stopping"
            } else {
                "ok"
            };
            let body = format!("{name} {state}\n");
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

/// An HTTP/1.1 server with keep-alive that answers every request with what it saw: its
/// hostname, the request line and the headers, one per line (for the L7 tests: paths,
/// forwarded headers; and a keep-alive upstream for the L7 benchmark).
fn http_echo(port: u16) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    let name = hostname();
    for s in l.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            echo_requests(s, &name);
        });
    }
}

/// `http-echo` over TLS, with the certificate chain and key of two PEM files (swarm
/// delivers them as configs or secrets): an upstream for `ssl_backend` routes.
fn https_echo(port: u16, cert: &str, key: &str) {
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| fail(&format!("{p}: {e}")));
    let chain = rustls_pemfile::certs(&mut read(cert).as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| fail(&format!("{cert}: {e}")));
    let key = rustls_pemfile::private_key(&mut read(key).as_slice())
        .ok()
        .flatten()
        .unwrap_or_else(|| fail(&format!("{key}: no private key")));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .unwrap_or_else(|e| fail(&format!("TLS configuration: {e}")));
    let config = std::sync::Arc::new(config);
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&e.to_string()));
    let name = hostname();
    for s in l.incoming().flatten() {
        let (name, config) = (name.clone(), config.clone());
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            echo_requests(rustls::StreamOwned::new(conn, s), &name);
        });
    }
}

/// Answers HTTP/1.1 requests on one connection until it closes: this container's name,
/// then the request line and headers as they came.
fn echo_requests<S: Read + Write>(s: S, name: &str) {
    let mut r = std::io::BufReader::new(s);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match std::io::BufRead::read_line(&mut r, &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let length: usize = head
            .iter()
            .filter_map(|h| h.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        // `/sleep/MS`: answers after that long (a request in flight, for tests).
        let ms = head
            .first()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.strip_prefix("/sleep/"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(ms) = ms {
            std::thread::sleep(Duration::from_millis(ms.min(60_000)));
        }
        let answer = format!("{name}\n{}\n", head.join("\n"));
        let out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if r.get_mut().write_all(out.as_bytes()).is_err() || r.get_mut().flush().is_err() {
            return;
        }
    }
}

/// One GET: the answer's body, or why there was none.
fn get_once(target: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    // Resolved every time (through the container's resolver: 127.0.0.11).
    let to = target
        .to_socket_addrs()
        .map_err(|e| format!("resolve: {e}"))?
        .next()
        .ok_or("resolve: no address")?;
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    out.split("\r\n\r\n")
        .nth(1)
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| format!("no body in {out:?}"))
}

/// GETs `target` in a loop (a new connection each time) until `stop` exists; then writes a
/// JSON summary to `out`: answers counted by body, and each failure with its time.
fn http_loop(target: &str, stop: &str, out: &str) {
    let start = Instant::now();
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut failures: Vec<String> = Vec::new();
    let (mut ok, mut failed) = (0u64, 0u64);
    while !std::path::Path::new(stop).exists() {
        match get_once(target) {
            Ok(body) => {
                ok += 1;
                *by.entry(body).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if failures.len() < 50 {
                    failures.push(format!("{:.3}s {e}", start.elapsed().as_secs_f64()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let json_str = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let by: Vec<String> = by
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_str(k)))
        .collect();
    let failures: Vec<String> = failures.iter().map(|f| json_str(f)).collect();
    let text = format!(
        "{{\"ok\":{ok},\"failed\":{failed},\"seconds\":{:.1},\"by\":{{{}}},\"failures\":[{}]}}\n",
        start.elapsed().as_secs_f64(),
        by.join(","),
        failures.join(",")
    );
    std::fs::write(out, text).unwrap_or_else(|e| fail(&e.to_string()));
}
