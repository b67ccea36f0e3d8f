//! A synthetic Docker Engine API for the control-plane benchmark, at sizes this machine
//! cannot run as containers (10 000 services × 10 tasks). Real HTTP over a unix socket, real
//! JSON shapes (every object is a recorded dockerd 20.10 answer, `tests/fixtures/docker`,
//! with its ids and addresses replaced), a real `/events` stream, and the filters meshd uses.
//! It counts every request and byte it serves: that is the manager-side load the benchmark
//! reports. Only for benchmarks: tests use real dockerd swarms.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::workspace_root;

fn fixture(name: &str) -> Value {
    let p = workspace_root().join("tests/fixtures/docker").join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Request and byte counts, total and per kind of request.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub by_path: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn count(&self, kind: &'static str, bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let mut m = self.by_path.lock().unwrap();
        let e = m.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes as u64;
    }
}

/// The cluster's shape.
#[derive(Clone, Debug)]
pub struct Spec {
    pub services: usize,
    pub tasks_per_service: usize,
    pub networks: usize,
    pub nodes: usize,
    /// Containers on "this" node: (name, its network namespace, indices of its networks).
    pub local: Vec<(String, PathBuf, Vec<usize>)>,
}

struct Task {
    service: String,
    slot: u64,
    node: usize,
    ip: Ipv4Addr,
    version: u64,
    rendered: Bytes,
}

struct Service {
    name: String,
    net: usize,
    vip: Ipv4Addr,
    version: u64,
    updating: bool,
    tasks: Vec<String>,
    rendered: Bytes,
    /// Its tasks as they appear in a `/tasks` answer (`{..},{..}`), joined once per change:
    /// a 100-service slice is then 100 pieces, not 1000 lookups and a 1.6 MB copy.
    tasks_rendered: Bytes,
}

/// An answer in pieces, sent as they are (one frame each, the length known up front).
#[derive(Debug, Default, PartialEq)]
pub struct Answer(Vec<Bytes>);

impl Answer {
    fn one(b: Bytes) -> Answer {
        Answer(vec![b])
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.0.concat()
    }
}

/// The whole cluster, rendered object by object.
pub struct World {
    templates: [Value; 5],
    networks: Vec<(String, String, Bytes)>,
    nodes: Vec<(String, Bytes)>,
    services: BTreeMap<String, Service>,
    tasks: BTreeMap<String, Task>,
    local: Vec<(String, Bytes)>,
    next_ip: Vec<u32>,
    next_id: u64,
    index: u64,
    info: Bytes,
}

/// An id as swarm makes them: a 128-bit number in 25 base-36 digits. Derived from the
/// object's kind and number (different for each, the same in every run), scrambled by an
/// odd multiplier, which keeps them distinct.
fn id(kind: &str, n: u64) -> String {
    let kind = kind.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut x =
        ((kind as u128) << 64 | n as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    let mut digits = [b'0'; 25];
    for d in digits.iter_mut().rev() {
        *d = b"0123456789abcdefghijklmnopqrstuvwxyz"[(x % 36) as usize];
        x /= 36;
    }
    String::from_utf8(digits.to_vec()).expect("ascii")
}

fn net_addr(net: usize, host: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        (net % 250) as u8 + 1,
        (host >> 8) as u8,
        (host & 0xff) as u8,
    )
}

impl World {
    fn new(spec: &Spec) -> World {
        let mut w = World {
            templates: [
                fixture("service.json"),
                fixture("task.json"),
                fixture("node.json"),
                fixture("network.json"),
                fixture("container.json"),
            ],
            networks: Vec::new(),
            nodes: Vec::new(),
            services: BTreeMap::new(),
            tasks: BTreeMap::new(),
            local: Vec::new(),
            next_ip: vec![2; spec.networks],
            next_id: 1,
            index: 100,
            info: Bytes::new(),
        };
        for i in 0..spec.networks {
            let nid = id("net", i as u64);
            let mut n = w.templates[3].clone();
            n["Id"] = json!(nid);
            n["Name"] = json!(format!("bench_net{i}"));
            n["IPAM"]["Config"] = json!([{"Subnet": format!("{}/16", net_addr(i, 0))}]);
            w.networks.push((
                nid,
                format!("bench_net{i}"),
                Bytes::from(serde_json::to_vec(&n).unwrap()),
            ));
        }
        for i in 0..spec.nodes {
            let nid = id("node", i as u64);
            let mut n = w.templates[2].clone();
            n["ID"] = json!(nid);
            n["Description"]["Hostname"] = json!(format!("bench{i}"));
            n["Status"]["State"] = json!("ready");
            n["Status"]["Addr"] = json!(format!("192.168.200.{}", i + 1));
            n["Spec"]["Role"] = json!(if i == 0 { "manager" } else { "worker" });
            w.nodes
                .push((nid, Bytes::from(serde_json::to_vec(&n).unwrap())));
        }
        for s in 0..spec.services {
            let sid = w.add_service(&format!("svc{s}"), s % spec.networks, spec.nodes);
            for _ in 0..spec.tasks_per_service {
                w.add_task(&sid, spec.nodes);
            }
        }
        for (i, (name, netns, nets)) in spec.local.iter().enumerate() {
            let mut c = w.templates[4].clone();
            let cid = format!("{:064x}", 0xc0ffee00u64 + i as u64);
            c["Id"] = json!(cid);
            c["Name"] = json!(format!("/{name}"));
            c["Config"]["Hostname"] = json!(name);
            c["Config"]["Labels"] = json!({});
            c["State"]["Status"] = json!("running");
            c["State"]["Health"] = Value::Null;
            c["HostConfig"]["NetworkMode"] = json!("default");
            c["NetworkSettings"]["SandboxKey"] = json!(netns.display().to_string());
            let mut eps = serde_json::Map::new();
            for &n in nets {
                let ip = w.alloc(n);
                let (nid, nname, _) = &w.networks[n];
                eps.insert(
                    nname.clone(),
                    json!({"NetworkID": nid, "IPAddress": ip.to_string(), "Aliases": null}),
                );
            }
            c["NetworkSettings"]["Networks"] = Value::Object(eps);
            w.local
                .push((cid, Bytes::from(serde_json::to_vec(&c).unwrap())));
        }
        let node0 = w.nodes.first().map(|n| n.0.clone()).unwrap_or_default();
        w.info = Bytes::from(
            serde_json::to_vec(&json!({"Swarm": {
                "NodeID": node0, "NodeAddr": "127.0.0.1", "LocalNodeState": "active",
                "ControlAvailable": true, "RemoteManagers": [{"NodeID": node0, "Addr": "127.0.0.1:2377"}]
            }}))
            .unwrap(),
        );
        w
    }

    fn alloc(&mut self, net: usize) -> Ipv4Addr {
        let h = self.next_ip[net];
        self.next_ip[net] += 1;
        net_addr(net, h)
    }

    fn render_service(&mut self, sid: &str) {
        let tpl = &self.templates[0];
        let s = self.services.get_mut(sid).expect("service");
        let nid = &self.networks[s.net].0;
        let mut v = tpl.clone();
        v["ID"] = json!(sid);
        v["Version"]["Index"] = json!(s.version);
        v["Spec"]["Name"] = json!(s.name);
        v["Spec"]["Labels"] = json!({});
        v["Spec"]["TaskTemplate"]["Networks"] = json!([{"Target": nid}]);
        v["Spec"]["Mode"]["Replicated"]["Replicas"] = json!(s.tasks.len());
        v["Spec"]["EndpointSpec"] = json!({"Mode": "vip"});
        v["Endpoint"] = json!({"Spec": {"Mode": "vip"}, "VirtualIPs": [{"NetworkID": nid, "Addr": format!("{}/16", s.vip)}]});
        if s.updating {
            v["UpdateStatus"] = json!({"State": "updating"});
        } else {
            v.as_object_mut().unwrap().remove("UpdateStatus");
        }
        s.rendered = Bytes::from(serde_json::to_vec(&v).unwrap());
    }

    fn add_service(&mut self, name: &str, net: usize, _nodes: usize) -> String {
        let sid = id("svc", self.next_id);
        self.next_id += 1;
        let vip = self.alloc(net);
        self.services.insert(
            sid.clone(),
            Service {
                name: name.into(),
                net,
                vip,
                version: self.index,
                updating: false,
                tasks: Vec::new(),
                rendered: Bytes::new(),
                tasks_rendered: Bytes::new(),
            },
        );
        self.render_service(&sid);
        sid
    }

    fn render_task(&mut self, tid: &str) {
        let tpl = &self.templates[1];
        let t = self.tasks.get_mut(tid).expect("task");
        let s = &self.services[&t.service];
        let (nid, nname, _) = &self.networks[s.net];
        let mut v = tpl.clone();
        v["ID"] = json!(tid);
        v["Version"]["Index"] = json!(t.version);
        v["ServiceID"] = json!(t.service);
        v["Slot"] = json!(t.slot);
        v["NodeID"] = json!(self.nodes[t.node].0);
        v["Status"]["State"] = json!("running");
        // A new container per version, its id distinct from every other task's.
        let container = tid.bytes().fold(t.version ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        v["Status"]["ContainerStatus"]["ContainerID"] =
            json!(format!("{container:016x}{:048x}", 0));
        v["DesiredState"] = json!("running");
        v["Spec"]["Networks"] = json!([{"Target": nid}]);
        v["NetworksAttachments"][0]["Network"]["ID"] = json!(nid);
        v["NetworksAttachments"][0]["Network"]["Spec"]["Name"] = json!(nname);
        v["NetworksAttachments"][0]["Addresses"] = json!([format!("{}/16", t.ip)]);
        t.rendered = Bytes::from(serde_json::to_vec(&v).unwrap());
    }

    fn add_task(&mut self, sid: &str, nodes: usize) -> String {
        let tid = id("task", self.next_id);
        self.next_id += 1;
        self.index += 1;
        let s = self.services.get_mut(sid).expect("service");
        let slot = s.tasks.len() as u64 + 1;
        s.tasks.push(tid.clone());
        let net = s.net;
        let ip = self.alloc(net);
        self.tasks.insert(
            tid.clone(),
            Task {
                service: sid.into(),
                slot,
                node: (self.next_id as usize) % nodes.max(1),
                ip,
                version: self.index,
                rendered: Bytes::new(),
            },
        );
        self.render_task(&tid);
        self.join_tasks(sid);
        tid
    }

    fn join_tasks(&mut self, sid: &str) {
        let s = &self.services[sid];
        let parts: Vec<&[u8]> = s
            .tasks
            .iter()
            .map(|t| &self.tasks[t].rendered[..])
            .collect();
        let joined = Bytes::from(parts.join(&b","[..]));
        self.services.get_mut(sid).expect("service").tasks_rendered = joined;
    }

    /// Replaces one task of a service by a new one (a failed task rescheduled, one step of a
    /// rolling update). Returns the new task's address.
    pub fn replace_task(&mut self, sid: &str, which: usize, nodes: usize) -> Ipv4Addr {
        let s = self.services.get_mut(sid).expect("service");
        let old = s.tasks.remove(which % s.tasks.len());
        self.tasks.remove(&old);
        // add_task joins the service's tasks again.
        let tid = self.add_task(sid, nodes);
        self.tasks[&tid].ip
    }

    pub fn set_updating(&mut self, sid: &str, updating: bool) {
        self.index += 1;
        let s = self.services.get_mut(sid).expect("service");
        s.updating = updating;
        s.version = self.index;
        self.render_service(sid);
    }

    pub fn node_id(&self, i: usize) -> String {
        self.nodes[i].0.clone()
    }

    pub fn service_ids(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    pub fn add_service_with_tasks(
        &mut self,
        name: &str,
        net: usize,
        tasks: usize,
        nodes: usize,
    ) -> String {
        let sid = self.add_service(name, net, nodes);
        for _ in 0..tasks {
            self.add_task(&sid, nodes);
        }
        self.render_service(&sid);
        sid
    }

    /// A JSON list of rendered pieces (empty pieces are skipped).
    fn list(items: impl Iterator<Item = Bytes>) -> Answer {
        let mut out = vec![Bytes::from_static(b"[")];
        for b in items.filter(|b| !b.is_empty()) {
            if out.len() > 1 {
                out.push(Bytes::from_static(b","));
            }
            out.push(b);
        }
        out.push(Bytes::from_static(b"]"));
        Answer(out)
    }

    fn network_inspect(&self, nid: &str) -> Option<Answer> {
        let (_, name, rendered) = self.networks.iter().find(|n| n.0 == nid)?;
        let mut v: Value = serde_json::from_slice(rendered).ok()?;
        let mut containers = serde_json::Map::new();
        for (cid, c) in &self.local {
            let c: Value = serde_json::from_slice(c).ok()?;
            if let Some(ep) = c["NetworkSettings"]["Networks"].get(name) {
                containers.insert(cid.clone(), json!({"IPv4Address": format!("{}/16", ep["IPAddress"].as_str().unwrap_or(""))}));
            }
        }
        v["Containers"] = Value::Object(containers);
        Some(Answer::one(Bytes::from(serde_json::to_vec(&v).ok()?)))
    }

    /// The answer to one GET (path without the API version, query included).
    fn answer(&self, path: &str) -> (&'static str, Option<Answer>) {
        let (p, query) = path.split_once('?').unwrap_or((path, ""));
        let filters = filters(query);
        let parts: Vec<&str> = p.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["info"] => ("info", Some(Answer::one(self.info.clone()))),
            ["services"] => (
                "services",
                Some(Self::list(
                    self.services.values().map(|s| s.rendered.clone()),
                )),
            ),
            ["services", id] => (
                "service",
                self.services
                    .get(*id)
                    .map(|s| Answer::one(s.rendered.clone())),
            ),
            ["tasks"] => {
                let want: Option<Vec<String>> = filters.get("service").cloned();
                let items: Vec<Bytes> = match want {
                    Some(ids) => ids
                        .iter()
                        .filter_map(|s| self.services.get(s))
                        .map(|s| s.tasks_rendered.clone())
                        .collect(),
                    None => self
                        .services
                        .values()
                        .map(|s| s.tasks_rendered.clone())
                        .collect(),
                };
                ("tasks", Some(Self::list(items.into_iter())))
            }
            ["networks"] => (
                "networks",
                Some(Self::list(self.networks.iter().map(|n| n.2.clone()))),
            ),
            ["networks", id] => ("network", self.network_inspect(id)),
            ["nodes"] => (
                "nodes",
                Some(Self::list(self.nodes.iter().map(|n| n.1.clone()))),
            ),
            ["nodes", id] => (
                "node",
                self.nodes
                    .iter()
                    .find(|n| n.0 == *id)
                    .map(|n| Answer::one(n.1.clone())),
            ),
            ["containers", "json"] => (
                "containers",
                Some(Self::list(
                    self.local
                        .iter()
                        .map(|(id, _)| Bytes::from(format!("{{\"Id\":\"{id}\"}}"))),
                )),
            ),
            ["containers", id, "json"] => (
                "container",
                self.local
                    .iter()
                    .find(|c| c.0 == *id)
                    .map(|c| Answer::one(c.1.clone())),
            ),
            _ => ("other", None),
        }
    }
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            if let Ok(v) = u8::from_str_radix(
                std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())]).unwrap_or(""),
                16,
            ) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `filters={"service":["a","b"],...}` from a query string.
fn filters(query: &str) -> BTreeMap<String, Vec<String>> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("filters="))
        .and_then(|f| serde_json::from_str(&unescape(f)).ok())
        .unwrap_or_default()
}

pub struct FakeDocker {
    pub socket: PathBuf,
    pub world: Arc<Mutex<World>>,
    pub counters: Arc<Counters>,
    events: broadcast::Sender<Bytes>,
    nodes: usize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDocker {
    /// Serves `spec` on the unix socket `socket` from a thread of its own.
    pub fn start(socket: &Path, spec: &Spec) -> Result<FakeDocker> {
        let world = Arc::new(Mutex::new(World::new(spec)));
        let counters = Arc::new(Counters::default());
        let (events, _) = broadcast::channel(4096);
        let _ = std::fs::remove_file(socket);
        let std_listener = std::os::unix::net::UnixListener::bind(socket)
            .with_context(|| format!("bind {}", socket.display()))?;
        std_listener.set_nonblocking(true)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (w, c, e) = (world.clone(), counters.clone(), events.clone());
        let thread = std::thread::Builder::new()
            .name("fake-docker".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::UnixListener::from_std(std_listener).expect("listener");
                    let serve = async {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                continue;
                            };
                            let (w, c, e) = (w.clone(), c.clone(), e.clone());
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    handle(req, w.clone(), c.clone(), e.clone())
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                });
            })?;
        Ok(FakeDocker {
            socket: socket.to_path_buf(),
            world,
            counters,
            events,
            nodes: spec.nodes,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Sends an event on every open `/events` stream.
    pub fn event(&self, kind: &str, action: &str, actor: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = json!({"Type": kind, "Action": action, "Actor": {"ID": actor, "Attributes": {}},
            "scope": "swarm", "time": now.as_secs(), "timeNano": now.as_nanos() as u64});
        let mut b = serde_json::to_vec(&line).unwrap();
        b.push(b'\n');
        let _ = self.events.send(Bytes::from(b));
    }
}

impl Drop for FakeDocker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    world: Arc<Mutex<World>>,
    counters: Arc<Counters>,
    events: broadcast::Sender<Bytes>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let path = path.strip_prefix("/v1.41").unwrap_or(&path).to_string();
    if path.starts_with("/events") {
        counters.count("events", 0);
        let rx = events.subscribe();
        let c = counters.clone();
        let stream = futures_util::stream::unfold((rx, c), |(mut rx, c)| async move {
            loop {
                match rx.recv().await {
                    Ok(b) => {
                        c.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                        return Some((Ok::<_, Infallible>(Frame::data(b)), (rx, c)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        return Ok(Response::new(StreamBody::new(stream).boxed()));
    }
    let (kind, body) = world.lock().unwrap().answer(&path);
    Ok(match body {
        Some(b) => {
            let len = b.len();
            counters.count(kind, len);
            let frames = futures_util::stream::iter(b.0.into_iter().map(|p| Ok(Frame::data(p))));
            let mut r = Response::new(StreamBody::new(frames).boxed());
            r.headers_mut()
                .insert(hyper::header::CONTENT_LENGTH, len.into());
            r
        }
        None => {
            counters.count(kind, 0);
            let mut r = Response::new(
                Full::new(Bytes::from_static(b"{\"message\":\"no such object\"}")).boxed(),
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_decode_from_the_query() {
        let f = filters("filters=%7B%22service%22%3A%5B%22a1%22%2C%22b2%22%5D%7D&x=1");
        assert_eq!(f["service"], ["a1", "b2"]);
    }

    #[test]
    fn the_world_answers_with_recorded_shapes() {
        let w = World::new(&Spec {
            services: 3,
            tasks_per_service: 2,
            networks: 2,
            nodes: 2,
            local: vec![],
        });
        let (_, tasks) = w.answer("/tasks");
        let v: Value = serde_json::from_slice(&tasks.unwrap().to_vec()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 6);
        assert!(v[0]["NetworksAttachments"][0]["Addresses"][0]
            .as_str()
            .unwrap()
            .starts_with("10."));
        let sid = w.service_ids()[0].clone();
        let (_, one) = w.answer(&format!(
            "/tasks?filters=%7B%22service%22%3A%5B%22{sid}%22%5D%7D"
        ));
        let v: Value = serde_json::from_slice(&one.unwrap().to_vec()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(w.answer("/services/nope").1, None);
    }
}
