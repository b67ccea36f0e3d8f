//! meshd's local API for meshctl: one JSON request line in, one JSON answer line out, over a
//! unix socket only root can open.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::UnixListener,
};
use tracing::warn;

use crate::{
    daemon::{unix_ms, Shared, Snapshot},
    model::EndpointMode,
};

pub const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Services,
    Service {
        name: String,
    },
    Maps,
    /// What container `from` would get for `name` (type `qtype`), and why.
    Dns {
        name: String,
        from: String,
        qtype: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub error: Option<String>,
}

/// Stops serving when dropped.
pub struct ApiGuard(tokio::task::JoinHandle<()>);

impl Drop for ApiGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn serve(path: &Path, shared: Arc<Shared>) -> Result<ApiGuard> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // A socket left by a killed meshd would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("bind API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(ApiGuard(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut reader = TokioBufReader::new(r);
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match handle_async(&shared, req).await {
                        Ok(data) => Answer {
                            ok: true,
                            data,
                            error: None,
                        },
                        Err(e) => Answer {
                            ok: false,
                            data: Value::Null,
                            error: Some(format!("{e:#}")),
                        },
                    },
                    Err(e) => Answer {
                        ok: false,
                        data: Value::Null,
                        error: Some(format!("bad request: {e}")),
                    },
                };
                let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                out.push(b'\n');
                if let Err(e) = w.write_all(&out).await {
                    warn!(error = %e, "API client went away");
                }
            });
        }
    })))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub id: String,
    pub name: String,
    pub mode: EndpointMode,
    pub vips: BTreeMap<String, Ipv4Addr>,
    pub backends: usize,
    pub connections: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub ip: Ipv4Addr,
    pub task_id: String,
    pub node_id: String,
    pub node: String,
    pub slot: Option<u64>,
    pub state: String,
    pub connections: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VipView {
    pub network_id: String,
    pub network: String,
    pub vip: Ipv4Addr,
    pub table_size: u32,
    pub connections: u64,
    /// Local sandboxes (containers) that see this VIP.
    pub sandboxes: Vec<String>,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub mode: EndpointMode,
    pub vips: Vec<VipView>,
    /// Tasks of the service that are not backends, and why.
    pub not_serving: Vec<Value>,
}

async fn handle_async(shared: &Shared, req: Request) -> Result<Value> {
    match req {
        Request::Dns { name, from, qtype } => dns_query(shared, &name, &from, &qtype).await,
        other => handle(shared, other),
    }
}

/// Runs a query through the same path a container's packet takes, from `from`'s networks.
async fn dns_query(shared: &Shared, name: &str, from: &str, qtype: &str) -> Result<Value> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    let resolver = shared
        .resolver
        .clone()
        .context("meshd runs with --no-dns: containers use dockerd's resolver")?;
    let (sandbox, network_names) = {
        let snap = shared.snapshot.lock().unwrap();
        let found = snap
            .state
            .sandboxes
            .iter()
            .find(|s| s.name == from || s.container_id.starts_with(from))
            .cloned();
        let Some(sb) = found else {
            let known: Vec<&str> = snap
                .state
                .sandboxes
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            anyhow::bail!(
                "no local container {from:?} (containers on this node: {})",
                known.join(", ")
            );
        };
        let names: Vec<String> = sb
            .networks
            .iter()
            .map(|n| {
                snap.state
                    .networks
                    .get(n)
                    .map_or(n.clone(), |n| n.name.clone())
            })
            .collect();
        (sb, names)
    };
    let mut qtype: RecordType = qtype
        .to_ascii_uppercase()
        .parse()
        .with_context(|| format!("unknown record type {qtype:?}"))?;
    // An address asks for its PTR.
    let qname = match name.parse::<Ipv4Addr>() {
        Ok(ip) => {
            qtype = RecordType::PTR;
            let o = ip.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        Err(_) if name.ends_with('.') => name.to_string(),
        Err(_) => format!("{name}."),
    };
    let qname_parsed =
        Name::from_ascii(&qname).with_context(|| format!("{name:?} is not a DNS name"))?;
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(qname_parsed, qtype));
    let packet = m.to_vec().context("encode query")?;
    let r = resolver
        .resolve(
            &packet,
            &sandbox.networks,
            meshd_dns::answer::Transport::Tcp,
        )
        .await;
    let reply = r.reply.as_deref().and_then(|b| Message::from_vec(b).ok());
    Ok(json!({
        "container": sandbox.name,
        "container_id": sandbox.container_id,
        "networks": network_names,
        "query": qname,
        "type": qtype.to_string(),
        "why": r.why,
        "rcode": reply.as_ref().map(|m| m.response_code().to_string()),
        "answers": reply.as_ref().map(|m| m.answers().iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_default(),
        "upstream": r.upstream,
        "upstream_error": r.upstream_error,
    }))
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        & 0xffff) as u16
}

fn handle(shared: &Shared, req: Request) -> Result<Value> {
    match req {
        Request::Dns { .. } => unreachable!("answered by handle_async"),
        Request::Status => {
            let snap = shared.snapshot.lock().unwrap();
            let mut dns = snap.dns.clone();
            if let Some(r) = &shared.resolver {
                dns.stats = r.stats.view();
            }
            Ok(json!({
                "node_id": snap.node_id,
                "uptime_s": (unix_ms().saturating_sub(snap.started_unix_ms)) / 1000,
                "docker": snap.docker,
                "datapath": {
                    "kind": "ebpf",
                    "pin_dir": snap.pin_dir,
                    "cgroup": snap.cgroup,
                    "adopted_at_start": snap.adopted,
                    "last_apply": snap.last_apply,
                    "applies_with_changes": snap.applies_with_changes,
                },
                "counts": {
                    "services": snap.state.services.len(),
                    "tasks": snap.state.tasks.len(),
                    "networks": snap.state.networks.len(),
                    "nodes": snap.state.nodes.len(),
                    "local_sandboxes": snap.state.sandboxes.len(),
                    "load_balancers": snap.desired.lbs.len(),
                    "vip_entries": snap.desired.vips.len(),
                },
                "event_to_map": Snapshot::latency(&snap.event_to_map),
                "read_to_map": Snapshot::latency(&snap.read_to_map),
                "rejected": snap.rejected(),
                "dns": dns,
            }))
        }
        Request::Services => {
            let counters = shared.datapath.lock().unwrap().counters()?;
            let snap = shared.snapshot.lock().unwrap();
            let list: Vec<ServiceSummary> = snap
                .state
                .services
                .values()
                .map(|s| {
                    let lbs: Vec<_> = snap
                        .desired
                        .lbs
                        .iter()
                        .filter(|(r, _)| r.service_id == s.id)
                        .collect();
                    ServiceSummary {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        mode: s.mode,
                        vips: s
                            .vips
                            .iter()
                            .map(|(n, ip)| {
                                let name = snap.state.networks.get(n).map_or(n, |n| &n.name);
                                (name.clone(), *ip)
                            })
                            .collect(),
                        backends: lbs
                            .iter()
                            .map(|(_, lb)| lb.backends.len())
                            .max()
                            .unwrap_or(0),
                        connections: lbs
                            .iter()
                            .map(|(r, _)| counters.per_lb.get(*r).copied().unwrap_or(0))
                            .sum(),
                    }
                })
                .collect();
            Ok(serde_json::to_value(list)?)
        }
        Request::Service { name } => {
            let counters = shared.datapath.lock().unwrap().counters()?;
            let snap = shared.snapshot.lock().unwrap();
            let s = snap
                .state
                .services
                .values()
                .find(|s| s.name == name || s.id == name || s.id.starts_with(&name))
                .with_context(|| format!("no service named {name:?}"))?;
            let node_name = |id: &str| {
                snap.state
                    .nodes
                    .get(id)
                    .map(|n| n.hostname.clone())
                    .unwrap_or_default()
            };
            let mut vips = Vec::new();
            for (r, lb) in snap
                .desired
                .lbs
                .iter()
                .filter(|(r, _)| r.service_id == s.id)
            {
                let sandboxes = snap
                    .desired
                    .vips
                    .iter()
                    .filter(|(_, lr)| *lr == r)
                    .filter_map(|((cookie, _), _)| {
                        snap.state
                            .sandboxes
                            .iter()
                            .find(|sb| sb.netns_cookie == *cookie)
                            .map(|sb| sb.name.clone())
                    })
                    .collect();
                let backends = lb
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        ip: b.ip,
                        task_id: b.task_id.clone(),
                        node: node_name(&b.node_id),
                        node_id: b.node_id.clone(),
                        slot: b.slot,
                        state: "running".into(),
                        connections: counters
                            .per_backend
                            .get(&(r.clone(), b.ip))
                            .copied()
                            .unwrap_or(0),
                    })
                    .collect();
                vips.push(VipView {
                    network_id: r.network_id.clone(),
                    network: lb.network_name.clone(),
                    vip: lb.vip,
                    table_size: lb.table_size,
                    connections: counters.per_lb.get(r).copied().unwrap_or(0),
                    sandboxes,
                    backends,
                });
            }
            let backend_ids: Vec<&str> = snap
                .desired
                .lbs
                .iter()
                .filter(|(r, _)| r.service_id == s.id)
                .flat_map(|(_, lb)| lb.backends.iter().map(|b| b.task_id.as_str()))
                .collect();
            let not_serving = snap
                .state
                .tasks
                .iter()
                .filter(|t| t.service_id == s.id && !backend_ids.contains(&t.id.as_str()))
                .map(|t| {
                    let why = if !t.is_live() {
                        format!("state {} / desired {}", t.state, t.desired_state)
                    } else if snap.state.nodes.get(&t.node_id).is_some_and(|n| n.is_down()) {
                        "node down".to_string()
                    } else {
                        "no address on a VIP network".to_string()
                    };
                    json!({"task_id": t.id, "node": node_name(&t.node_id), "slot": t.slot, "why": why})
                })
                .collect();
            Ok(serde_json::to_value(ServiceView {
                id: s.id.clone(),
                name: s.name.clone(),
                mode: s.mode,
                vips,
                not_serving,
            })?)
        }
        Request::Maps => {
            let dump = shared.datapath.lock().unwrap().dump()?;
            Ok(serde_json::to_value(dump)?)
        }
    }
}

/// Used by meshctl: send one request, read one answer.
pub fn call(socket: &Path, req: &Request) -> Result<Value> {
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach meshd at {} (is meshd running? `systemctl status meshd`)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = &stream;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    let answer: Answer =
        serde_json::from_str(&answer).context("meshd sent an unreadable answer")?;
    if answer.ok {
        Ok(answer.data)
    } else {
        anyhow::bail!("{}", answer.error.unwrap_or_else(|| "meshd failed".into()))
    }
}
