//! Forwarding names that are not ours to the host's resolvers, as the raw packet: the
//! client's id, flags and EDNS options reach the upstream untouched, and its answer comes
//! back as is. At most three upstreams (as in resolv.conf), tried in order with a timeout
//! each; one that failed recently goes to the back of the line so a dead server costs one
//! timeout, not one per query. A truncated UDP answer is asked again over TCP.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::op::{Message, MessageType};
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

/// glibc reads at most three nameservers; so do we.
pub const MAX_UPSTREAMS: usize = 3;
/// How long a failed upstream stays at the back of the line.
const PENALTY: Duration = Duration::from_secs(30);
/// Largest answer we read over UDP from an upstream.
const MAX_UDP_ANSWER: usize = 65_535;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("line {line}: `{text}` is not a nameserver address")]
    BadAddress { line: usize, text: String },
}

/// The nameservers of a resolv.conf text, in order, without our own address (a host that
/// points at 127.0.0.11 would loop) and without duplicates; at most three. Unreadable lines
/// are reported, not fatal: the rest still resolves.
pub fn parse_resolv_conf(text: &str) -> (Vec<SocketAddr>, Vec<ConfigError>) {
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            errors.push(ConfigError::BadAddress {
                line: i + 1,
                text: line.into(),
            });
            continue;
        };
        // An IPv6 link-local address may carry a zone (`fe80::1%eth0`): not supported.
        match addr.parse::<IpAddr>() {
            Ok(ip) if ip == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)) => {}
            Ok(ip) => {
                let sa = SocketAddr::new(ip, 53);
                if !out.contains(&sa) && out.len() < MAX_UPSTREAMS {
                    out.push(sa);
                }
            }
            Err(_) => errors.push(ConfigError::BadAddress {
                line: i + 1,
                text: addr.into(),
            }),
        }
    }
    (out, errors)
}

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("no upstream resolvers configured")]
    NoUpstreams,
    #[error("too many queries already waiting on upstreams")]
    Busy,
    #[error("every upstream failed: {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<(SocketAddr, String)>),
}

/// An upstream's answer, and how it was had.
#[derive(Debug)]
pub struct Forwarded {
    pub reply: Vec<u8>,
    pub upstream: SocketAddr,
    /// Asked again over TCP after a truncated UDP answer (or the client came over TCP).
    pub over_tcp: bool,
    /// Upstreams that failed before this one answered.
    pub failed: Vec<(SocketAddr, String)>,
}

pub struct Upstreams {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    last_failure: Mutex<Vec<Option<Instant>>>,
    /// Servers whose last exchange failed (no answer, not a SERVFAIL): logged once when one
    /// goes down and once when it answers again, not per query.
    unreachable: Mutex<Vec<bool>>,
}

impl Upstreams {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        let n = servers.len();
        Self {
            servers,
            timeout,
            last_failure: Mutex::new(vec![None; n]),
            unreachable: Mutex::new(vec![false; n]),
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The same timeout over `servers`; a server also in `self` keeps its failure time.
    pub fn replaced(&self, servers: Vec<SocketAddr>) -> Upstreams {
        let old = self.last_failure.lock().unwrap();
        let was = self.unreachable.lock().unwrap();
        let at = |s: &SocketAddr| self.servers.iter().position(|o| o == s);
        let last_failure = servers.iter().map(|s| old[at(s)?]).collect();
        let unreachable = servers
            .iter()
            .map(|s| at(s).is_some_and(|i| was[i]))
            .collect();
        Upstreams {
            servers,
            timeout: self.timeout,
            last_failure: Mutex::new(last_failure),
            unreachable: Mutex::new(unreachable),
        }
    }

    /// Healthy servers first, in configured order; recently failed ones after them.
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let failures = self.last_failure.lock().unwrap();
        let recent = |i: usize| failures[i].is_some_and(|t| now.duration_since(t) < PENALTY);
        let mut order: Vec<usize> = (0..self.servers.len()).filter(|&i| !recent(i)).collect();
        order.extend((0..self.servers.len()).filter(|&i| recent(i)));
        order
    }

    fn mark(&self, i: usize, failed: bool) {
        self.last_failure.lock().unwrap()[i] = failed.then(Instant::now);
    }

    /// Each server, and whether its last exchange got an answer (a server not asked yet
    /// counts as reachable).
    pub fn reachable(&self) -> Vec<(SocketAddr, bool)> {
        let down = self.unreachable.lock().unwrap();
        self.servers
            .iter()
            .copied()
            .zip(down.iter().map(|d| !d))
            .collect()
    }

    /// Whether server `i` answered at all (`None`) or not (why): the down and up lines an
    /// operator needs. True when this changed whether it is down.
    fn reached(&self, i: usize, error: Option<&str>) -> bool {
        let was = std::mem::replace(&mut self.unreachable.lock().unwrap()[i], error.is_some());
        match (was, error) {
            (false, Some(error)) => tracing::warn!(
                upstream = %self.servers[i],
                error,
                "DNS upstream down: forwarded queries go to the next one, or fail"
            ),
            (true, None) => {
                tracing::info!(upstream = %self.servers[i], "DNS upstream answers again")
            }
            _ => return false,
        }
        true
    }

    /// Sends `query` upstream. `tcp`: the client asked over TCP, so we do too.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Forwarded, ForwardError> {
        if self.servers.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let mut failed = Vec::new();
        // An upstream that answers SERVFAIL or REFUSED is worth skipping for the next one;
        // if all of them do, the last such answer is still an answer.
        let mut fallback: Option<Forwarded> = None;
        for i in self.order() {
            let server = self.servers[i];
            let attempt = if tcp {
                exchange_tcp(server, query, self.timeout)
                    .await
                    .map(|r| (r, true))
            } else {
                match exchange_udp(server, query, self.timeout).await {
                    Ok(r) if is_truncated(&r) => exchange_tcp(server, query, self.timeout)
                        .await
                        .map(|r| (r, true)),
                    other => other.map(|r| (r, false)),
                }
            };
            match attempt {
                Ok((reply, over_tcp)) => {
                    self.reached(i, None);
                    let rcode = reply.get(3).map_or(0, |b| b & 0x0f);
                    let answer = Forwarded {
                        reply,
                        upstream: server,
                        over_tcp,
                        failed: failed.clone(),
                    };
                    // 2 = SERVFAIL, 5 = REFUSED.
                    if rcode == 2 || rcode == 5 {
                        self.mark(i, true);
                        failed.push((server, format!("answered rcode {rcode}")));
                        fallback = Some(answer);
                        continue;
                    }
                    self.mark(i, false);
                    return Ok(answer);
                }
                Err(e) => {
                    self.mark(i, true);
                    self.reached(i, Some(&e));
                    failed.push((server, e));
                }
            }
        }
        match fallback {
            Some(mut answer) => {
                answer.failed = failed;
                Ok(answer)
            }
            None => Err(ForwardError::AllFailed(failed)),
        }
    }
}

fn is_truncated(reply: &[u8]) -> bool {
    reply.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// Whether `reply` answers `query`: a response with the query's id.
fn answers(query: &[u8], reply: &[u8]) -> bool {
    reply.len() >= 12 && reply[..2] == query[..2] && reply[2] & 0x80 != 0
}

async fn exchange_udp(
    server: SocketAddr,
    query: &[u8],
    limit: Duration,
) -> Result<Vec<u8>, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("bind: {e}"))?;
    // Connected: the kernel drops datagrams from anyone but the upstream.
    sock.connect(server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    sock.send(query).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| format!("no answer within {limit:?}"))?
            .map_err(|e| format!("receive: {e}"))?;
        // A stray or late datagram with another id is not our answer: keep waiting.
        if answers(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    query: &[u8],
    limit: Duration,
) -> Result<Vec<u8>, String> {
    let len = u16::try_from(query.len()).map_err(|_| "query too long for TCP".to_string())?;
    let work = async {
        let mut s = TcpStream::connect(server)
            .await
            .map_err(|e| format!("tcp connect: {e}"))?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        s.write_all(&framed)
            .await
            .map_err(|e| format!("tcp send: {e}"))?;
        let mut lenbuf = [0u8; 2];
        s.read_exact(&mut lenbuf)
            .await
            .map_err(|e| format!("tcp receive: {e}"))?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(lenbuf))];
        s.read_exact(&mut reply)
            .await
            .map_err(|e| format!("tcp receive: {e}"))?;
        if !answers(query, &reply) {
            return Err("tcp answer does not match the query".to_string());
        }
        Ok(reply)
    };
    timeout(limit, work)
        .await
        .map_err(|_| format!("no TCP answer within {limit:?}"))?
}

/// `reply` cut down for a UDP client that cannot take it whole: header and question with
/// TC set, so the client asks again over TCP. `None` when the reply does not parse.
pub fn truncate_for_udp(reply: &[u8]) -> Option<Vec<u8>> {
    let full = Message::from_vec(reply).ok()?;
    let mut m = Message::new();
    m.set_id(full.id())
        .set_message_type(MessageType::Response)
        .set_op_code(full.op_code())
        .set_response_code(full.response_code())
        .set_recursion_desired(full.recursion_desired())
        .set_recursion_available(full.recursion_available())
        .set_truncated(true);
    for q in full.queries() {
        m.add_query(q.clone());
    }
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_keeps_three_nameservers_in_order_without_ourselves() {
        let text = "# generated\nsearch example.org\nnameserver 127.0.0.11\n\
                    nameserver 10.0.0.2 # office\nnameserver 10.0.0.2\nnameserver ::1\n\
                    options ndots:0\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n";
        let (servers, errors) = parse_resolv_conf(text);
        let want: Vec<SocketAddr> = ["10.0.0.2:53", "[::1]:53", "10.0.0.3:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(servers, want);
        assert!(errors.is_empty());
    }

    #[test]
    fn a_bad_nameserver_line_is_reported_and_the_rest_kept() {
        let (servers, errors) =
            parse_resolv_conf("nameserver dns.example\nnameserver\nnameserver 9.9.9.9\n");
        assert_eq!(servers, vec!["9.9.9.9:53".parse().unwrap()]);
        assert_eq!(
            errors,
            vec![
                ConfigError::BadAddress {
                    line: 1,
                    text: "dns.example".into()
                },
                ConfigError::BadAddress {
                    line: 2,
                    text: "nameserver".into()
                }
            ]
        );
    }

    #[test]
    fn failed_upstreams_go_to_the_back() {
        let u = Upstreams::new(
            vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
                "127.0.0.1:3".parse().unwrap(),
            ],
            Duration::from_millis(10),
        );
        assert_eq!(u.order(), [0, 1, 2]);
        u.mark(0, true);
        assert_eq!(u.order(), [1, 2, 0]);
        u.mark(0, false);
        assert_eq!(u.order(), [0, 1, 2]);
    }

    #[test]
    fn an_upstream_goes_down_and_up_once_not_per_query() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let u = Upstreams::new(vec![a, b], Duration::from_millis(10));
        assert_eq!(u.reachable(), [(a, true), (b, true)]);
        assert!(u.reached(0, Some("timed out")), "the first failure is news");
        assert!(!u.reached(0, Some("timed out")), "a repeat is not");
        assert!(
            !u.reached(1, None),
            "an answer from a server that was up is not"
        );
        assert_eq!(u.reachable(), [(a, false), (b, true)]);
        // Down survives a resolv.conf rewrite that keeps the server.
        let v = u.replaced(vec![b, a]);
        assert_eq!(v.reachable(), [(b, true), (a, false)]);
        assert!(v.reached(1, None), "answering again is news");
        assert_eq!(v.reachable(), [(b, true), (a, true)]);
    }

    #[test]
    fn a_replaced_set_remembers_failures_of_the_servers_it_keeps() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let u = Upstreams::new(vec![a, b], Duration::from_millis(10));
        u.mark(0, true);
        // `a` is still recently failed in the new set; `c` is new and healthy.
        let v = u.replaced(vec![a, c]);
        assert_eq!(v.servers(), [a, c]);
        assert_eq!(v.order(), [1, 0]);
        assert_eq!(v.timeout, u.timeout);
        // A failure of `b`, which is gone, does not carry over to whatever takes its place.
        u.mark(0, false);
        u.mark(1, true);
        assert_eq!(u.replaced(vec![c, a]).order(), [0, 1]);
    }

    #[test]
    fn truncation_keeps_id_and_question() {
        use hickory_proto::{
            op::Query,
            rr::{rdata::A, Name, RData, Record, RecordType},
        };
        let name = Name::from_ascii("big.example.").unwrap();
        let mut m = Message::new();
        m.set_id(77).set_message_type(MessageType::Response);
        m.add_query(Query::query(name.clone(), RecordType::A));
        for i in 0..100 {
            m.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
            ));
        }
        let t = truncate_for_udp(&m.to_vec().unwrap()).unwrap();
        let t = Message::from_vec(&t).unwrap();
        assert_eq!(t.id(), 77);
        assert!(t.truncated());
        assert!(t.answers().is_empty());
        assert_eq!(t.queries()[0].name(), &name);
    }
}
