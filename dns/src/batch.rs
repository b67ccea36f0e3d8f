//! Many datagrams per system call (`recvmmsg`/`sendmmsg`). Under load a container's socket
//! holds several queries at once; reading them together and sending the answers together
//! saves a system call each, and one loopback delivery then wakes the client once for many
//! answers instead of once per answer.
use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::RawFd,
};

/// Datagrams per call.
pub const BATCH: usize = 32;
/// Bytes kept of one request; longer ones are flagged (`MSG_TRUNC`) and answered FORMERR
/// by the parser like any short read. EDNS clients are told 1232 bytes is safe.
pub const REQUEST_MAX: usize = 1232;

/// Receive buffers for one batch; reused for every read.
pub struct RecvBatch {
    bufs: Vec<[u8; REQUEST_MAX]>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            bufs: vec![[0u8; REQUEST_MAX]; BATCH],
            // SAFETY: all-zero is a valid value for these plain C structs.
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovs: vec![unsafe { zeroed() }; BATCH],
            hdrs: vec![unsafe { zeroed() }; BATCH],
        }
    }
}

impl RecvBatch {
    /// Reads what is queued on `fd` (non-blocking), up to `BATCH` datagrams. `WouldBlock`
    /// when nothing is.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: REQUEST_MAX,
            };
            // SAFETY: as above.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        // SAFETY: every header points at buffers owned by self that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The `i`th datagram read, and who sent it.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(REQUEST_MAX);
        let a = &self.addrs[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        // A request longer than our buffer is cut: hand on only its header, which the parser
        // rejects (FORMERR to the client's id) instead of reading a cut question.
        let data = if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            &self.bufs[i][..len.min(12)]
        } else {
            &self.bufs[i][..len]
        };
        (data, SocketAddr::V4(from))
    }
}

/// Sends each (bytes, destination) on `fd` in as few calls as the kernel allows. Returns how
/// many were sent; the caller sends the rest the slow way (the socket buffer was full).
pub fn send_all(fd: RawFd, out: &[(Vec<u8>, SocketAddr)]) -> usize {
    let mut addrs: Vec<libc::sockaddr_in> = Vec::with_capacity(out.len());
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(out.len());
    for (bytes, to) in out {
        let SocketAddr::V4(to) = to else {
            // Our sockets are IPv4: cannot happen; stop here and let the caller handle it.
            break;
        };
        // SAFETY: all-zero is a valid sockaddr_in.
        let mut a: libc::sockaddr_in = unsafe { zeroed() };
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_port = to.port().to_be();
        a.sin_addr.s_addr = u32::from(*to.ip()).to_be();
        addrs.push(a);
        iovs.push(libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        });
    }
    let mut hdrs: Vec<libc::mmsghdr> = (0..iovs.len())
        .map(|i| {
            // SAFETY: as above.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    let mut sent = 0;
    while sent < hdrs.len() {
        // SAFETY: headers point at addrs, iovs and the caller's buffers, all alive here.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[sent..].as_mut_ptr(),
                (hdrs.len() - sent) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
        sent += n as usize;
    }
    sent
}
