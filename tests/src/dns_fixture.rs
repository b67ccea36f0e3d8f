//! DNS test tools: `dig`'s output read into a struct, and an upstream resolver the test runs
//! on loopback inside a node's namespace (so meshd's forwarding is tested with no outside
//! traffic). The upstream knows a few names, answers a big one truncated over UDP (whole over
//! TCP), says NXDOMAIN to the rest, and records what it was asked and how.
use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::A, RData, Record, RecordType},
};

/// What dig printed: the status, the flags and the answer records.
#[derive(Clone, Debug, Default)]
pub struct DigAnswer {
    pub status: String,
    pub flags: Vec<String>,
    /// (name, ttl, type, data)
    pub answers: Vec<(String, u32, String, String)>,
    pub raw: String,
}

impl DigAnswer {
    pub fn parse(out: &str) -> Result<DigAnswer> {
        let mut d = DigAnswer {
            raw: out.to_string(),
            ..Default::default()
        };
        for line in out.lines() {
            if let Some(rest) = line.split("status: ").nth(1) {
                d.status = rest.split(',').next().unwrap_or("").trim().to_string();
            } else if let Some(rest) = line.strip_prefix(";; flags: ") {
                d.flags = rest
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
            } else if !line.starts_with(';') && !line.trim().is_empty() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() >= 5 {
                    d.answers.push((
                        f[0].to_string(),
                        f[1].parse().context("dig TTL")?,
                        f[3].to_string(),
                        f[4..].join(" "),
                    ));
                }
            }
        }
        if d.status.is_empty() {
            bail!("dig printed no status:\n{out}");
        }
        Ok(d)
    }

    /// The addresses of the A records.
    pub fn addrs(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .answers
            .iter()
            .filter(|a| a.2 == "A")
            .filter_map(|a| a.3.parse().ok())
            .collect();
        v.sort();
        v
    }

    pub fn ttls(&self) -> Vec<u32> {
        self.answers.iter().map(|a| a.1).collect()
    }
}

/// Runs a prepared dig command (`+noall +answer +comments` are added) and parses it.
pub fn dig(mut cmd: Command) -> Result<DigAnswer> {
    cmd.args(["+noall", "+answer", "+comments"]);
    let out = cmd.output().context("run dig")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "dig failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    DigAnswer::parse(&text)
}

/// Names the upstream knows.
pub const EXT_NAME: &str = "ext.test.";
pub const EXT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Too big for 512-byte UDP: the upstream truncates it over UDP.
pub const BIG_NAME: &str = "big.test.";
pub const BIG_COUNT: u8 = 60;

/// A query the upstream saw: (name, over TCP).
pub type Seen = (String, bool);

pub struct Upstream {
    /// Answers (UDP and TCP on the same port).
    pub addr: SocketAddr,
    /// Reads queries and never answers: an upstream that times out.
    pub silent: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Upstream {
    /// Starts inside the named network namespace (`/var/run/netns/NAME`) on port 53, the
    /// only port a resolv.conf can name: answering on 127.0.0.1, silent on 127.0.0.2.
    pub fn start(netns: &str) -> Result<Upstream> {
        let ns = fs::File::open(format!("/var/run/netns/{netns}"))?;
        let (udp, tcp, silent) = std::thread::spawn(move || -> Result<_> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let udp = UdpSocket::bind("127.0.0.1:53")?;
            let tcp = TcpListener::bind(udp.local_addr()?)?;
            let silent = UdpSocket::bind("127.0.0.2:53")?;
            Ok((udp, tcp, silent))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("upstream thread panicked"))??;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        for s in [&udp, &silent] {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        tcp.set_nonblocking(true)?;
        let addr = udp.local_addr()?;
        let silent_addr = silent.local_addr()?;
        let mut threads = Vec::new();
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            threads.push(std::thread::spawn(move || serve_udp(udp, &seen, &stop)));
        }
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            threads.push(std::thread::spawn(move || serve_tcp(tcp, &seen, &stop)));
        }
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let _ = silent.recv_from(&mut buf);
                }
            }));
        }
        Ok(Upstream {
            addr,
            silent: silent_addr,
            seen,
            stop,
            threads,
        })
    }

    /// How many times `name` was asked, over UDP and over TCP.
    pub fn count(&self, name: &str) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        let n = |tcp: bool| seen.iter().filter(|s| s.0 == name && s.1 == tcp).count();
        (n(false), n(true))
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_udp(sock: UdpSocket, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = respond(&buf[..n], false, seen) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

fn serve_tcp(listener: TcpListener, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut len = [0u8; 2];
        while s.read_exact(&mut len).is_ok() {
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if s.read_exact(&mut q).is_err() {
                break;
            }
            let Some(reply) = respond(&q, true, seen) else {
                break;
            };
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if s.write_all(&framed).is_err() {
                break;
            }
        }
    }
}

fn respond(packet: &[u8], tcp: bool, seen: &Mutex<Vec<Seen>>) -> Option<Vec<u8>> {
    let q = Message::from_vec(packet).ok()?;
    let query = q.queries().first()?.clone();
    let name = query.name().to_ascii().to_ascii_lowercase();
    seen.lock().unwrap().push((name.clone(), tcp));
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .add_query(query.clone());
    let a = |ip: Ipv4Addr| Record::from_rdata(query.name().clone(), 300, RData::A(A(ip)));
    match (name.as_str(), query.query_type()) {
        (EXT_NAME, RecordType::A) => {
            m.add_answer(a(EXT_ADDR));
        }
        (BIG_NAME, RecordType::A) if !tcp => {
            m.set_truncated(true);
        }
        (BIG_NAME, RecordType::A) => {
            for i in 1..=BIG_COUNT {
                m.add_answer(a(Ipv4Addr::new(198, 51, 100, i)));
            }
        }
        (EXT_NAME | BIG_NAME, _) => {}
        _ => {
            m.set_response_code(ResponseCode::NXDomain);
        }
    }
    m.to_vec().ok()
}
