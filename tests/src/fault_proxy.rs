//! A unix-socket proxy in front of a real dockerd that, when told to, breaks its answers the
//! ways an engine under stress does: a 500, a body cut off half-way (the connection
//! closed), a body that stops half-way and never ends. Event streams break the same way
//! at their next event. Between faults it passes bytes through untouched.
use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
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

struct Shared {
    upstream: PathBuf,
    fault: Mutex<Fault>,
    /// Every client connection, so a change of fault drops them all (pooled connections
    /// would otherwise carry on under the old rule).
    conns: Mutex<Vec<UnixStream>>,
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
                if let Ok(c) = conn.try_clone() {
                    s.conns.lock().unwrap().push(c);
                }
                let s = s.clone();
                std::thread::spawn(move || serve(&s, conn));
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
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Answers broken so far.
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

fn serve(s: &Shared, mut client: UnixStream) {
    // Requests meshd sends are GETs: a head and no body.
    let Some((mut request, rest)) = read_head(&mut client) else {
        return;
    };
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
