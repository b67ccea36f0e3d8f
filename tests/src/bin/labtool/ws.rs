//! A minimal websocket server and client (RFC 6455: the upgrade handshake with its accept
//! key, and single text frames), for the L7 tests: enough to prove an upgrade goes through
//! the proxy and frames flow both ways afterwards.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Serves websockets on `port`: answers the upgrade, then echoes each text frame back
/// prefixed with this container's hostname. A request that does not ask to upgrade gets a
/// 426.
pub fn serve(port: u16, name: String) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| super::fail(&e.to_string()));
    for s in l.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(s);
            let head = read_head(&mut r);
            let key = header(&head, "sec-websocket-key");
            let upgrade =
                header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
            let (Some(key), true) = (key, upgrade) else {
                let _ = r.get_mut().write_all(
                    b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return;
            };
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                accept(&key)
            );
            if r.get_mut().write_all(answer.as_bytes()).is_err() {
                return;
            }
            while let Some(text) = read_frame(&mut r) {
                let reply = format!("{name} {text}");
                if r.get_mut()
                    .write_all(&frame(reply.as_bytes(), None))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Connects to `to`, upgrades `path` on `host`, sends `text`, prints the answer frame.
pub fn ask(to: SocketAddr, host: &str, path: &str, text: &str) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| e.to_string())?;
    let head = read_head(&mut r);
    let status = head.first().cloned().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {status}"));
    }
    if header(&head, "sec-websocket-accept").as_deref() != Some(accept(key).as_str()) {
        return Err(format!("wrong accept key in {head:?}"));
    }
    r.get_mut()
        .write_all(&frame(text.as_bytes(), Some([1, 2, 3, 4])))
        .map_err(|e| e.to_string())?;
    read_frame(&mut r).ok_or_else(|| "no frame came back".to_string())
}

fn read_head(r: &mut BufReader<TcpStream>) -> Vec<String> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return head,
            Ok(_) => {}
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return head;
        }
        head.push(line);
    }
}

fn header(head: &[String], name: &str) -> Option<String> {
    head.iter()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// One text frame, masked with `mask` (clients must mask, servers must not).
fn frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x81];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(bit | n as u8),
        n => {
            f.push(bit | 126);
            f.extend((n as u16).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend(m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend(payload),
    }
    f
}

/// The payload of the next frame, as text.
fn read_frame(r: &mut impl Read) -> Option<String> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).ok()?;
    let masked = h[1] & 0x80 != 0;
    let mut len = usize::from(h[1] & 0x7f);
    if len == 126 {
        let mut l = [0u8; 2];
        r.read_exact(&mut l).ok()?;
        len = usize::from(u16::from_be_bytes(l));
    } else if len == 127 {
        return None;
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).ok()?;
    }
    let mut p = vec![0u8; len];
    r.read_exact(&mut p).ok()?;
    if masked {
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    String::from_utf8(p).ok()
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
fn accept(key: &str) -> String {
    base64(&sha1(format!("{key}{GUID}").as_bytes()))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64) * 8;
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend(bits.to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                chunk[4 * i],
                chunk[4 * i + 1],
                chunk[4 * i + 2],
                chunk[4 * i + 3],
            ]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
