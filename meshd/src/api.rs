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
    model::EndpointMode,
    status::{latency, unix_ms, Mode, Shared, VipDatapath},
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
    /// The ingress mesh: published ports, their tasks, counters, flow tables.
    Ingress,
    /// The L7 front end: routes, their backends and counters, rejected labels.
    Routes,
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
    pub slot: Option<u32>,
    pub state: String,
    pub connections: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VipView {
    pub network_id: String,
    pub network: String,
    pub vip: Ipv4Addr,
    /// In this node's maps: a local container is on that network.
    pub programmed: bool,
    pub connections: u64,
    /// Local sandboxes (containers) that see this VIP.
    pub sandboxes: Vec<String>,
    pub backends: Vec<BackendView>,
    /// Under the IPVS datapath: the VIP's IPVS service in each of those sandboxes, as the
    /// kernel reports it (weights, connection counts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipvs: Vec<crate::datapath::ipvs::applier::SandboxIpvs>,
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
        let core = shared.core.read().unwrap();
        let state = &core.state;
        let found = state
            .sandboxes
            .values()
            .find(|s| s.name == from || s.container_id.starts_with(from))
            .cloned();
        let Some(sb) = found else {
            let known: Vec<&str> = state.sandboxes.values().map(|s| s.name.as_str()).collect();
            anyhow::bail!(
                "no local container {from:?} (containers on this node: {})",
                known.join(", ")
            );
        };
        let names: Vec<String> = sb
            .networks
            .iter()
            .map(|n| {
                state
                    .networks
                    .get(n.as_str())
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

/// Whether meshd has read what it needs once: its containers, and the swarm (by whichever
/// path this node's role uses).
fn ready(shared: &Shared) -> bool {
    let local = shared.local.lock().unwrap().resyncs > 0;
    let swarm = match shared.identity.lock().unwrap().mode {
        Mode::Standalone => true,
        Mode::Manager | Mode::ManagerApi => shared.swarm.lock().unwrap().resyncs > 0,
        Mode::Feed => shared.feed_client.lock().unwrap().snapshots > 0,
    };
    local && swarm
}

fn status(shared: &Shared) -> Result<Value> {
    let is_ready = ready(shared);
    let counts = counts(shared);
    let id = shared.identity.lock().unwrap();
    let core = shared.core.read().unwrap();
    let desired = core.compiler.desired();
    let rec = shared.reconcile.lock().unwrap().clone();
    let datapath = match &shared.datapath {
        VipDatapath::Ebpf(e) => {
            let e = e.lock().unwrap();
            json!({
                "kind": shared.choice.kind,
                "reason": shared.choice.reason,
                "pin_dir": id.pin_dir,
                "cgroup": id.cgroup,
                "adopted_at_start": e.adopted,
                "map_entries": e.entries(),
                "ingress": e.ingress_status(),
                "appliers": rec.appliers,
            })
        }
        VipDatapath::Ipvs(i) => json!({
            "kind": shared.choice.kind,
            "reason": shared.choice.reason,
            "ipvs": i.lock().unwrap().summary(),
            "ingress": null,
            "appliers": rec.appliers,
        }),
    };
    let mut dns = json!(*shared.dns_status.lock().unwrap());
    if let Some(d) = &shared.dns {
        let d = d.lock().unwrap();
        dns["sandboxes"] = json!(d.served());
        dns["open_failures"] = json!(d.failures());
    }
    if let Some(r) = &shared.resolver {
        dns["stats"] = json!(r.stats.view());
    }
    dns["names"] = json!(desired
        .zones
        .networks
        .values()
        .map(|n| n.len())
        .sum::<usize>());
    let feed_seq = core
        .feed
        .as_ref()
        .map(|f| (f.epoch, f.seq, f.bytes_encoded));
    let swarm = match id.mode {
        Mode::Manager | Mode::ManagerApi => json!(*shared.swarm.lock().unwrap()),
        _ => Value::Null,
    };
    let feed = match id.mode {
        Mode::Manager => {
            let mut hub = json!(*shared.hub.lock().unwrap());
            if let Some((epoch, seq, bytes)) = feed_seq {
                hub["epoch"] = json!(epoch);
                hub["seq"] = json!(seq);
                hub["bytes_encoded"] = json!(bytes);
            }
            json!({"hub": hub, "uploads": shared.feed_client.lock().unwrap().uploads})
        }
        Mode::Feed => json!({"client": *shared.feed_client.lock().unwrap()}),
        _ => Value::Null,
    };
    let served = (unix_ms().saturating_sub(id.started_unix_ms)) / 1000;
    Ok(json!({
        "version": crate::VERSION,
        "node_id": id.node_id,
        "mode": id.mode,
        "uptime_s": served,
        "ready": is_ready,
        "local": *shared.local.lock().unwrap(),
        "swarm": swarm,
        "feed": feed,
        "datapath": datapath,
        "reconcile": {
            "batches": rec.batches,
            "changes": rec.changes,
            "steps": rec.steps,
            "sweeps": rec.sweeps,
            "ready_unix_ms": rec.ready_unix_ms,
            "first_compile_ms": rec.first_compile_ms,
            "early_compile_ms": rec.early_compile_ms,
            "early_apply_ms": rec.early_apply_ms,
            "first_apply_ms": rec.first_apply_ms,
            "first_apply_writes": rec.first_apply_writes,
        },
        "counts": counts,
        "event_to_map": latency(&rec.event_to_map),
        "read_to_map": latency(&rec.read_to_map),
        "step_time": latency(&rec.step_time),
        "rejected": desired.rejected,
        "dns": dns,
    }))
}

fn counts(shared: &Shared) -> Value {
    let core = shared.core.read().unwrap();
    let (s, d) = (&core.state, core.compiler.desired());
    json!({
        "services": s.services.len(),
        "tasks": s.tasks.len(),
        "networks": s.networks.len(),
        "nodes": s.nodes.len(),
        "local_sandboxes": s.sandboxes.len(),
        "reports": s.reports.len(),
        "load_balancers": d.lbs.len(),
        "backends": d.lbs.values().map(|l| l.backends.len()).sum::<usize>(),
        "scoped_sandboxes": d.sandboxes.len(),
    })
}

/// Connection counts for the services views: made (eBPF) or tracked now (IPVS).
fn counters(shared: &Shared) -> Result<crate::datapath::ebpf::Counters> {
    match &shared.datapath {
        VipDatapath::Ebpf(e) => e.lock().unwrap().counters(),
        VipDatapath::Ipvs(_) => {
            let core = shared.core.read().unwrap();
            let desired = core.compiler.desired();
            let sandboxes: Vec<(String, String)> = desired
                .sandboxes
                .values()
                .filter(|s| !s.netns_path.is_empty())
                .map(|s| (s.name.clone(), s.netns_path.clone()))
                .collect();
            let lbs = desired.lbs.clone();
            drop(core);
            Ok(crate::datapath::ipvs::applier::counters(&lbs, &sandboxes))
        }
    }
}

/// The eBPF datapath, for the views only it has.
fn ebpf_only<'a>(
    shared: &'a Shared,
    what: &str,
) -> Result<&'a std::sync::Mutex<crate::datapath::ebpf::EbpfDatapath>> {
    shared.datapath.ebpf().map(|e| &**e).with_context(|| {
        format!(
            "`meshctl {what}` shows eBPF maps; this node runs the IPVS datapath ({}): see \
             `meshctl service NAME` for its IPVS view",
            shared.choice.reason
        )
    })
}

fn handle(shared: &Shared, req: Request) -> Result<Value> {
    match req {
        Request::Dns { .. } => unreachable!("answered by handle_async"),
        Request::Status => status(shared),
        Request::Services => {
            let counters = counters(shared)?;
            let core = shared.core.read().unwrap();
            let (state, desired) = (&core.state, core.compiler.desired());
            let list: Vec<ServiceSummary> = state
                .services
                .values()
                .map(|s| {
                    let lbs: Vec<_> = desired.lbs_of(&s.id).collect();
                    ServiceSummary {
                        id: s.id.to_string(),
                        name: s.name.to_string(),
                        mode: s.mode,
                        vips: s
                            .vips
                            .iter()
                            .map(|(n, ip)| {
                                let name = state.networks.get(n).map_or(&**n, |n| n.name.as_str());
                                (name.to_string(), *ip)
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
            let counters = counters(shared)?;
            let core = shared.core.read().unwrap();
            let (state, desired) = (&core.state, core.compiler.desired());
            let s = state
                .services
                .values()
                .find(|s| *s.name == *name || *s.id == *name || s.id.starts_with(&name))
                .with_context(|| format!("no service named {name:?}"))?;
            let node_name = |id: &str| {
                state
                    .nodes
                    .get(id)
                    .map(|n| n.hostname.clone())
                    .unwrap_or_default()
            };
            let mut vips = Vec::new();
            for (r, lb) in crate::compile::all_service_lbs(state, &s.id) {
                let programmed = desired.lbs.contains_key(&r);
                let sandboxes = desired
                    .sandboxes
                    .values()
                    .filter(|sc| sc.networks.iter().any(|n| *n == *r.network_id))
                    .map(|sc| sc.name.clone())
                    .collect();
                let backends = lb
                    .backends
                    .iter()
                    .map(|&ip| {
                        let task =
                            crate::compile::backend_task(state, &r.service_id, &r.network_id, ip);
                        let node_id = task.map(|t| t.node_id.to_string()).unwrap_or_default();
                        BackendView {
                            ip,
                            task_id: task.map(|t| t.id.to_string()).unwrap_or_default(),
                            node: node_name(&node_id),
                            node_id,
                            slot: task.and_then(|t| t.slot),
                            state: "running".into(),
                            connections: counters
                                .per_backend
                                .get(&(r.clone(), ip))
                                .copied()
                                .unwrap_or(0),
                        }
                    })
                    .collect();
                let ipvs = match &shared.datapath {
                    VipDatapath::Ipvs(_) if programmed => {
                        let seen: Vec<(String, String)> = desired
                            .sandboxes
                            .values()
                            .filter(|sc| sc.networks.iter().any(|n| *n == *r.network_id))
                            .map(|sc| (sc.name.clone(), sc.netns_path.clone()))
                            .collect();
                        crate::datapath::ipvs::applier::view(lb.vip, &seen)
                    }
                    _ => vec![],
                };
                vips.push(VipView {
                    ipvs,
                    network_id: r.network_id.to_string(),
                    network: state
                        .networks
                        .get(&r.network_id)
                        .map(|n| n.name.clone())
                        .unwrap_or_default(),
                    vip: lb.vip,
                    programmed,
                    connections: counters.per_lb.get(&r).copied().unwrap_or(0),
                    sandboxes,
                    backends,
                });
            }
            // The tasks behind some backend, as the views above found them.
            let backend_ids: std::collections::BTreeSet<&str> = vips
                .iter()
                .flat_map(|v| v.backends.iter().map(|b| b.task_id.as_str()))
                .collect();
            let not_serving = state
                .tasks_of(&s.id)
                .filter(|t| !backend_ids.contains(&*t.id))
                .map(|t| {
                    let why = if t.state != crate::model::TaskState::Running || t.desired != crate::model::TaskState::Running {
                        format!("state {} / desired {}", t.state, t.desired)
                    } else if state.nodes.get(&t.node_id).is_some_and(|n| n.is_down()) {
                        "node down".to_string()
                    } else if !state.serves(t) {
                        "held back by its node (health check failing, or stopping)".to_string()
                    } else if s.mode == EndpointMode::Dnsrr {
                        "dnsrr: served by DNS only".to_string()
                    } else {
                        "no address on a VIP network".to_string()
                    };
                    json!({"task_id": t.id, "node": node_name(&t.node_id), "slot": t.slot, "why": why})
                })
                .collect();
            Ok(serde_json::to_value(ServiceView {
                id: s.id.to_string(),
                name: s.name.to_string(),
                mode: s.mode,
                vips,
                not_serving,
            })?)
        }
        Request::Maps => {
            let dump = ebpf_only(shared, "maps")?.lock().unwrap().dump()?;
            Ok(serde_json::to_value(dump)?)
        }
        Request::Ingress => {
            let desired = shared.core.read().unwrap().compiler.desired().clone();
            let Some(ebpf) = shared.datapath.ebpf() else {
                anyhow::bail!(
                    "this node runs the IPVS datapath ({}): published ports are Docker's own \
                     ingress (IPVS in its ingress_sbox)",
                    shared.choice.reason
                );
            };
            let view = ebpf
                .lock()
                .unwrap()
                .ingress_view(&desired)
                .context("meshd runs with --no-ingress: published ports are Docker's")?;
            Ok(serde_json::to_value(view)?)
        }
        Request::Routes => Ok(serde_json::to_value(crate::l7::RoutesView::of(shared))?),
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
