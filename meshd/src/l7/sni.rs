//! The server name of a TLS ClientHello, read without taking the bytes off the socket: what
//! `ssl_passthrough` routes by before deciding whether meshd terminates the connection.
//! Only as much of the handshake as leads to the SNI extension is read; anything that is
//! not a well-formed ClientHello gives None (and the connection goes to meshd's own TLS,
//! which refuses it properly).

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed (the record is not complete yet).
    Partial,
    /// A ClientHello, and the server name it asks for (None: it names none).
    Name(Option<String>),
    /// Not a TLS ClientHello.
    NotTls,
}

/// Reads the SNI of the ClientHello at the start of `buf`.
pub fn server_name(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Partial;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Partial;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + len {
        return Hello::Partial;
    }
    match parse(&buf[5..5 + len]) {
        Some(name) => Hello::Name(name),
        None => Hello::NotTls,
    }
}

/// A cursor over a byte slice that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a length prefix of `width` bytes.
    fn vec(&mut self, width: usize) -> Option<Reader<'a>> {
        let n = match width {
            1 => self.u8()?,
            2 => self.u16()?,
            _ => {
                let b = self.take(3)?;
                usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
            }
        };
        self.take(n).map(Reader)
    }
}

/// The handshake message of one record: Some(name or none) for a ClientHello.
fn parse(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None;
    }
    // A ClientHello split over records is cut short here: read what there is.
    let mut hello = match r.vec(3) {
        Some(h) => h,
        None => Reader(r.0),
    };
    hello.take(2 + 32)?; // version, random
    hello.vec(1)?; // session id
    hello.vec(2)?; // cipher suites
    hello.vec(1)?; // compression methods
    let Some(mut exts) = hello.vec(2) else {
        return Some(None);
    };
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut body = exts.vec(2)?;
        if kind != 0 {
            continue;
        }
        let mut list = body.vec(2)?;
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec(2)?;
            if name_type == 0 {
                let s = std::str::from_utf8(name.0).ok()?;
                return Some(Some(s.to_ascii_lowercase()));
            }
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ClientHello record naming `host` (or none).
    fn hello(host: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // An extension before SNI, as real clients send (supported_groups).
        exts.extend([0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
        if let Some(h) = host {
            let mut list = vec![0u8];
            list.extend((h.len() as u16).to_be_bytes());
            list.extend(h.as_bytes());
            let mut sni = (list.len() as u16).to_be_bytes().to_vec();
            sni.extend(list);
            exts.extend([0x00, 0x00]);
            exts.extend((sni.len() as u16).to_be_bytes());
            exts.extend(sni);
        }
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.extend([0]); // no session id
        body.extend([0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend([0x01, 0x00]); // null compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1u8];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn the_name_is_read_and_partial_records_wait() {
        let h = hello(Some("Shop.Example.com"));
        assert_eq!(
            server_name(&h),
            Hello::Name(Some("shop.example.com".into()))
        );
        assert_eq!(server_name(&h[..h.len() - 1]), Hello::Partial);
        assert_eq!(server_name(&h[..3]), Hello::Partial);
        assert_eq!(server_name(&hello(None)), Hello::Name(None));
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
    }

    proptest! {
        /// Garbage after a TLS record header, or a hello cut anywhere: never a panic.
        #[test]
        fn any_bytes_are_answered(tail in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..200) {
            let mut buf = vec![0x16, 0x03, 0x01];
            buf.extend((tail.len() as u16).to_be_bytes());
            buf.extend(&tail);
            let _ = server_name(&buf);
            let h = hello(Some("a.example.com"));
            let _ = server_name(&h[..cut.min(h.len())]);
        }
    }
}
