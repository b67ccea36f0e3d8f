//! The Docker Engine API's JSON → model objects. Pure. Each object is decoded on its own
//! from its slice of the answer (a list is split into raw elements first), so one that does
//! not parse is rejected with its reason and the rest is used; nothing builds a whole JSON
//! tree of a large answer. Fields meshd does not read are skipped unparsed.
use std::{borrow::Cow, collections::BTreeMap, net::Ipv4Addr};

use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::model::{
    EndpointMode, Health, Id, Kind, NetMap, Network, Node, NodeState, Protocol, PublishMode,
    PublishedPort, Rejected, Role, SandboxEndpoint, Service, ShortId, Task, TaskState,
};

/// `null` reads as the type's default (Docker writes `null` for empty lists and maps).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawVersion {
    index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawService {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    version: RawVersion,
    spec: RawServiceSpec,
    #[serde(default)]
    endpoint: RawEndpoint,
    #[serde(default, deserialize_with = "nullable")]
    update_status: Option<RawUpdateStatus>,
    #[serde(default)]
    created_at: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawServiceSpec {
    name: String,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    task_template: RawTaskTemplate,
    #[serde(deserialize_with = "nullable")]
    endpoint_spec: Option<RawEndpointSpec>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawTaskTemplate {
    #[serde(deserialize_with = "nullable")]
    networks: Vec<RawAttachment>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawAttachment {
    target: String,
    #[serde(deserialize_with = "nullable")]
    aliases: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawEndpointSpec {
    mode: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawEndpoint {
    #[serde(deserialize_with = "nullable")]
    ports: Vec<RawPort>,
    #[serde(rename = "VirtualIPs", deserialize_with = "nullable")]
    virtual_ips: Vec<RawVip>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawPort {
    protocol: Option<String>,
    target_port: u32,
    published_port: u32,
    publish_mode: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawVip {
    #[serde(rename = "NetworkID")]
    network_id: String,
    addr: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawUpdateStatus {
    state: String,
}

/// "10.0.1.2/24" → 10.0.1.2.
fn cidr_addr(s: &str) -> Result<Ipv4Addr, String> {
    let ip = s.split('/').next().unwrap_or(s);
    ip.parse().map_err(|_| format!("bad IPv4 address {s:?}"))
}

fn port(n: u32, what: &str) -> Result<u16, String> {
    u16::try_from(n).map_err(|_| format!("{what} {n} is not a port number"))
}

fn need<S: AsRef<str>>(s: S, what: &str) -> Result<S, String> {
    if s.as_ref().is_empty() {
        Err(format!("missing {what}"))
    } else {
        Ok(s)
    }
}

/// One object of an answer. The reason a bad one is rejected names the field
/// (`Spec.Name: invalid type: integer `42`, expected a string`): the answer is read again
/// with its path tracked, only when the fast read failed.
fn parse<T: DeserializeOwned>(raw: &RawValue) -> Result<T, String> {
    serde_json::from_str(raw.get()).map_err(|fast| {
        let mut de = serde_json::Deserializer::from_str(raw.get());
        match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(e) => {
                let path = e.path().to_string();
                let what = without_position(e.inner());
                if path == "." {
                    what
                } else {
                    format!("{path}: {what}")
                }
            }
            Ok(_) => without_position(&fast),
        }
    })
}

/// A JSON error without its " at line 1 column 164": within one object it says nothing
/// the field path does not.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&at).unwrap_or(&text).to_string()
}

pub fn service(raw: &RawValue) -> Result<Service, String> {
    let r: RawService = parse(raw)?;
    let id = need(r.id, "ID")?;
    let name = need(r.spec.name, "Spec.Name")?;
    let mode = match r
        .spec
        .endpoint_spec
        .and_then(|e| e.mode)
        .as_deref()
        .unwrap_or("vip")
    {
        "vip" | "" => EndpointMode::Vip,
        "dnsrr" => EndpointMode::Dnsrr,
        other => return Err(format!("unknown endpoint mode {other:?}")),
    };
    let mut vips = NetMap::new();
    for v in r.endpoint.virtual_ips {
        let net = need(v.network_id, "VirtualIPs.NetworkID")?;
        // IPv6-only VIPs are left to a later version; an empty Addr is "none yet".
        match v.addr.as_deref() {
            None | Some("") => continue,
            Some(a) if a.contains(':') => continue,
            Some(a) => {
                vips.insert(net.into(), cidr_addr(a)?);
            }
        }
    }
    let mut aliases = BTreeMap::new();
    for att in r.spec.task_template.networks {
        let target = need(att.target, "TaskTemplate.Networks.Target")?;
        if !att.aliases.is_empty() {
            aliases.insert(target, att.aliases);
        }
    }
    let mut ports = Vec::new();
    for p in r.endpoint.ports {
        ports.push(PublishedPort {
            protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("tcp")),
            target: port(p.target_port, "TargetPort")?,
            published: Some(port(p.published_port, "PublishedPort")?).filter(|&n| n != 0),
            mode: PublishMode::parse(p.publish_mode.as_deref().unwrap_or("ingress")),
        });
    }
    let updating = r
        .update_status
        .is_some_and(|u| matches!(u.state.as_str(), "updating" | "rollback_started"));
    Ok(Service {
        id: id.into(),
        name: name.into(),
        mode,
        vips,
        aliases,
        ports,
        labels: r.spec.labels,
        updating,
        version: r.version.index,
        created: comparable_time(&r.created_at),
    })
}

/// An RFC 3339 time as Docker writes it (`2024-05-01T10:00:00.12Z`, the fraction of
/// variable length), rewritten so that comparing the strings compares the times: the
/// fraction padded to nanoseconds. Anything else is kept as it is.
fn comparable_time(t: &str) -> String {
    let Some(body) = t.strip_suffix('Z') else {
        return t.to_string();
    };
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return t.to_string();
    }
    format!("{secs}.{frac:0<9}Z")
}

/// A JSON string, borrowed from the answer unless it has escapes (ids and states never do):
/// decoding a 1000-task `/tasks` slice made a `String` of every field, most of them only to
/// be copied again or parsed.
#[derive(Default)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(Visit(std::marker::PhantomData))
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTask<'a> {
    #[serde(rename = "ID", borrow)]
    id: Text<'a>,
    #[serde(rename = "ServiceID", default, borrow)]
    service_id: Text<'a>,
    #[serde(rename = "NodeID", default, borrow, deserialize_with = "nullable")]
    node_id: Text<'a>,
    #[serde(default, deserialize_with = "nullable")]
    slot: Option<u32>,
    #[serde(default, borrow)]
    status: RawTaskStatus<'a>,
    #[serde(default, borrow)]
    desired_state: Text<'a>,
    #[serde(default, borrow, deserialize_with = "nullable")]
    networks_attachments: Vec<RawTaskAttachment<'a>>,
    #[serde(default, borrow)]
    spec: RawTaskSpec<'a>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawTaskStatus<'a> {
    #[serde(borrow)]
    state: Text<'a>,
    #[serde(borrow, deserialize_with = "nullable")]
    container_status: Option<RawContainerStatus<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawContainerStatus<'a> {
    #[serde(rename = "ContainerID", borrow)]
    container_id: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawTaskAttachment<'a> {
    #[serde(borrow)]
    network: RawNetworkRef<'a>,
    #[serde(borrow, deserialize_with = "nullable")]
    addresses: Vec<Text<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNetworkRef<'a> {
    #[serde(rename = "ID", borrow)]
    id: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawTaskSpec<'a> {
    #[serde(borrow, deserialize_with = "nullable")]
    container_spec: Option<RawContainerSpec<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawContainerSpec<'a> {
    #[serde(borrow)]
    hostname: Text<'a>,
}

pub fn task(raw: &RawValue) -> Result<Task, String> {
    task_from(serde_json::from_str(raw.get()).map_err(|e| e.to_string())?)
}

fn task_from(r: RawTask<'_>) -> Result<Task, String> {
    let mut addresses = NetMap::new();
    for att in &r.networks_attachments {
        let net: Id = need(&*att.network.id, "NetworksAttachments.Network.ID")?.into();
        for a in att.addresses.iter().filter(|a| !a.contains(':')) {
            addresses.insert(net.clone(), cidr_addr(a)?);
        }
    }
    Ok(Task {
        id: need(&*r.id, "ID")?.into(),
        service_id: need(&*r.service_id, "ServiceID")?.into(),
        // A task not yet scheduled has no node; it is not a backend either way.
        node_id: (*r.node_id).into(),
        slot: r.slot,
        state: TaskState::parse(need(&*r.status.state, "Status.State")?),
        desired: TaskState::parse(need(&*r.desired_state, "DesiredState")?),
        addresses,
        container_id: r
            .status
            .container_status
            // Only its short form is ever shown (a name in DNS): keep 12 characters, not 64.
            .and_then(|c| ShortId::new(&c.container_id)),
        hostname: r
            .spec
            .container_spec
            .map(|c| c.hostname)
            .filter(|h| !h.is_empty())
            .map(|h| Box::from(&*h)),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetwork {
    id: String,
    name: String,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    ingress: bool,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    attachable: bool,
}

pub fn network(raw: &RawValue) -> Result<Network, String> {
    let r: RawNetwork = parse(raw)?;
    Ok(Network {
        id: need(r.id, "Id")?.into(),
        name: need(r.name, "Name")?,
        internal: r.internal,
        ingress: r.ingress,
        scope: r.scope,
        attachable: r.attachable,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNode {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    version: RawVersion,
    #[serde(default)]
    spec: RawNodeSpec,
    status: RawNodeStatus,
    #[serde(default, deserialize_with = "nullable")]
    manager_status: Option<RawManagerStatus>,
    #[serde(default)]
    description: RawNodeDescription,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNodeSpec {
    role: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNodeStatus {
    state: String,
    addr: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawManagerStatus {
    addr: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNodeDescription {
    hostname: String,
}

pub fn node(raw: &RawValue) -> Result<Node, String> {
    let r: RawNode = parse(raw)?;
    let addr = match r.status.addr.as_str() {
        "" | "0.0.0.0" => None,
        a if a.contains(':') => None,
        a => Some(cidr_addr(a)?),
    };
    Ok(Node {
        id: need(r.id, "ID")?.into(),
        hostname: r.description.hostname,
        state: NodeState::parse(&need(r.status.state, "Status.State")?),
        role: Role::parse(&r.spec.role),
        addr,
        manager_addr: r.manager_status.map(|m| m.addr).filter(|a| !a.is_empty()),
        version: r.version.index,
    })
}

/// A local container, from `GET /containers/{id}/json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspected {
    pub id: String,
    pub name: String,
    /// `State.Status`: created, running, paused, restarting, removing, exited, dead.
    pub status: String,
    pub health: Health,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    /// `HostConfig.NetworkMode` is host: no namespace of its own to scope.
    pub host_network: bool,
    /// `NetworkSettings.SandboxKey`: its namespace, once Docker made one.
    pub sandbox_key: Option<String>,
    /// Network ids, sorted.
    pub networks: Vec<String>,
    pub endpoints: NetMap<SandboxEndpoint>,
    /// Its address on `docker_gwbridge` (not in the inspect answer: the network says it).
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl Inspected {
    /// The swarm task this container runs.
    pub fn task_id(&self) -> Option<&str> {
        self.labels
            .get("com.docker.swarm.task.id")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn service_id(&self) -> Option<&str> {
        self.labels
            .get("com.docker.swarm.service.id")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Whether its namespace is one the datapath should serve now: it exists (Docker makes
    /// it at `network connect`, before the entrypoint runs) and the container has not
    /// stopped.
    pub fn is_live(&self) -> bool {
        !self.host_network
            && self.sandbox_key.is_some()
            && matches!(
                self.status.as_str(),
                "created" | "running" | "paused" | "restarting"
            )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawInspect {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    state: RawContainerState,
    #[serde(default)]
    config: RawConfig,
    #[serde(default)]
    host_config: RawHostConfig,
    #[serde(default)]
    network_settings: RawNetworkSettings,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawContainerState {
    status: String,
    #[serde(deserialize_with = "nullable")]
    health: Option<RawHealth>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawHealth {
    status: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawConfig {
    hostname: String,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawHostConfig {
    network_mode: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNetworkSettings {
    sandbox_key: String,
    #[serde(deserialize_with = "nullable")]
    networks: BTreeMap<String, RawEndpointSettings>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawEndpointSettings {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "IPAddress")]
    ip_address: String,
    #[serde(deserialize_with = "nullable")]
    aliases: Vec<String>,
    #[serde(rename = "DNSNames", deserialize_with = "nullable")]
    dns_names: Vec<String>,
}

pub fn inspect(raw: &RawValue) -> Result<Inspected, String> {
    let r: RawInspect = parse(raw)?;
    let mut networks = Vec::new();
    let mut endpoints = NetMap::new();
    for (net_name, ep) in r.network_settings.networks {
        if ep.network_id.is_empty() {
            return Err(format!("network {net_name} has no NetworkID"));
        }
        let addr = match ep.ip_address.as_str() {
            "" => None,
            a => Some(cidr_addr(a)?),
        };
        // Network aliases, with the `DNSNames` Docker 25+ reports (name, aliases, short
        // id, hostname), once each.
        let mut aliases: Vec<String> = Vec::new();
        for a in ep.aliases.into_iter().chain(ep.dns_names) {
            if !aliases.contains(&a) {
                aliases.push(a);
            }
        }
        networks.push(ep.network_id.clone());
        endpoints.insert(ep.network_id.into(), SandboxEndpoint { addr, aliases });
    }
    networks.sort();
    Ok(Inspected {
        id: need(r.id, "Id")?,
        name: r.name.trim_start_matches('/').to_string(),
        status: r.state.status,
        health: r
            .state
            .health
            .map_or(Health::None, |h| Health::parse(&h.status)),
        hostname: r.config.hostname,
        labels: r.config.labels,
        host_network: r.host_config.network_mode == "host",
        sandbox_key: Some(r.network_settings.sandbox_key).filter(|k| !k.is_empty()),
        networks,
        endpoints,
        gateway: None,
    })
}

/// `GET /containers/json`: just the ids (each is inspected on its own).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawSummary {
    id: String,
}

pub fn container_id(raw: &RawValue) -> Result<String, String> {
    let r: RawSummary = parse(raw)?;
    need(r.id, "Id")
}

/// One line of `/events`: what happened to which object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Event {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Action")]
    pub action: String,
    #[serde(rename = "Actor")]
    pub actor: Actor,
    #[serde(rename = "timeNano")]
    pub time_nano: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Actor {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Attributes", deserialize_with = "nullable")]
    pub attributes: BTreeMap<String, String>,
}

pub fn event(line: &[u8]) -> Result<Event, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad event line: {e}"))
}

/// The id of a raw object, for a rejection that names it (`ID` or `Id`).
fn id_of(raw: &RawValue) -> String {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Ids {
        #[serde(rename = "ID")]
        upper: Option<serde_json::Value>,
        #[serde(rename = "Id")]
        mixed: Option<serde_json::Value>,
    }
    let ids: Ids = serde_json::from_str(raw.get()).unwrap_or_default();
    match ids.upper.or(ids.mixed) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.chars().take(64).collect(),
        _ => "?".into(),
    }
}

/// Splits a list answer into its elements, without decoding them.
pub fn elements(body: &[u8]) -> Result<Vec<&RawValue>, String> {
    serde_json::from_slice::<Vec<&RawValue>>(body)
        .map_err(|e| format!("answer is not a JSON array: {e}"))
}

/// Decodes every element of a list answer; those that do not decode come back as
/// rejections naming their id and reason.
pub fn list<T>(
    body: &[u8],
    kind: Kind,
    decode: fn(&RawValue) -> Result<T, String>,
) -> Result<(Vec<T>, Vec<Rejected>), String> {
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    for raw in elements(body)? {
        match decode(raw) {
            Ok(t) => ok.push(t),
            Err(reason) => rejected.push(Rejected {
                kind,
                id: id_of(raw),
                reason,
            }),
        }
    }
    Ok((ok, rejected))
}

/// A `/tasks` answer: in one pass over the bytes when every task decodes (the cold read of a
/// large swarm is mostly this), else task by task, so each bad one is rejected alone.
pub fn tasks(body: &[u8]) -> Result<(Vec<Task>, Vec<Rejected>), String> {
    list_of(body, Kind::Task, task_from, task)
}

fn list_of<'a, R: Deserialize<'a>, T>(
    body: &'a [u8],
    kind: Kind,
    from: fn(R) -> Result<T, String>,
    one: fn(&RawValue) -> Result<T, String>,
) -> Result<(Vec<T>, Vec<Rejected>), String> {
    if let Ok(raws) = serde_json::from_slice::<Vec<R>>(body) {
        if let Ok(ok) = raws
            .into_iter()
            .map(from)
            .collect::<Result<Vec<T>, String>>()
        {
            return Ok((ok, Vec::new()));
        }
    }
    list(body, kind, one)
}

/// Decodes one object answer (`GET /services/{id}`, `/containers/{id}/json`).
pub fn one<T>(
    body: &[u8],
    kind: Kind,
    decode: fn(&RawValue) -> Result<T, String>,
) -> Result<T, Rejected> {
    let raw: &RawValue = serde_json::from_slice(body).map_err(|e| Rejected {
        kind,
        id: "?".into(),
        reason: format!("answer is not JSON: {e}"),
    })?;
    decode(raw).map_err(|reason| Rejected {
        kind,
        id: id_of(raw),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(v: serde_json::Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn creation_times_compare_as_strings_in_time_order() {
        let a = comparable_time("2024-05-01T10:00:00.1Z");
        let b = comparable_time("2024-05-01T10:00:00.117276406Z");
        let c = comparable_time("2024-05-01T10:00:01Z");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a, "2024-05-01T10:00:00.100000000Z");
        assert_eq!(comparable_time("garbage"), "garbage");
    }

    #[test]
    fn a_task_reads_its_addresses_from_networks_attachments() {
        let t = task(&raw(json!({
            "ID": "t1", "ServiceID": "s1", "NodeID": "n1", "Slot": 2, "Version": {"Index": 7},
            "Status": {"State": "running", "ContainerStatus": {"ContainerID": "c1"}},
            "DesiredState": "running",
            "NetworksAttachments": [
                {"Network": {"ID": "net1"}, "Addresses": ["10.0.1.5/24"]},
                {"Network": {"ID": "net2"}, "Addresses": ["fd00::5/64", "10.0.2.9/24"]}
            ]
        })))
        .unwrap();
        assert_eq!(t.addresses["net1"], "10.0.1.5".parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.addresses["net2"], "10.0.2.9".parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.slot, Some(2));
        assert_eq!(t.container_id.as_deref(), Some("c1"));
        assert!(t.serves(None, false));
    }

    /// Strings are borrowed from the answer where they can be; one with an escape (which
    /// cannot be) decodes as well, and `null` where Docker writes it reads as empty.
    #[test]
    fn escaped_strings_and_nulls_decode_like_plain_ones() {
        let body = br#"[{"ID": "t\u0031", "ServiceID": "s1", "NodeID": null,
            "Status": {"State": "running", "ContainerStatus": null}, "DesiredState": "run\u006eing",
            "Spec": {"ContainerSpec": {"Hostname": "h\"1"}},
            "NetworksAttachments": [{"Network": {"ID": "net1"}, "Addresses": ["10.0.1.5\/24"]}]}]"#;
        let (ok, rejected) = tasks(body).unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        let t = &ok[0];
        assert_eq!(
            (&*t.id, &*t.node_id, t.desired),
            ("t1", "", TaskState::Running)
        );
        assert_eq!(t.hostname.as_deref(), Some("h\"1"));
        assert_eq!(t.addresses["net1"], "10.0.1.5".parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.container_id, None);
    }

    #[test]
    fn a_tasks_answer_decodes_in_one_pass_or_rejects_each_bad_task_alone() {
        let good = |id: &str| {
            json!({"ID": id, "ServiceID": "s1", "Status": {"State": "running"},
                   "DesiredState": "running"})
        };
        let all_good = json!([good("t1"), good("t2")]).to_string();
        let (ok, rejected) = tasks(all_good.as_bytes()).unwrap();
        assert_eq!(
            (
                ok.iter().map(|t| &*t.id).collect::<Vec<_>>(),
                rejected.len()
            ),
            (vec!["t1", "t2"], 0)
        );
        assert_eq!(
            ok,
            list(all_good.as_bytes(), Kind::Task, task).unwrap().0,
            "the one-pass path decodes as the element-wise one"
        );
        // A wrong type (a JSON error inside one task) and a missing field (a decode error
        // after it): each task rejected alone, the rest kept.
        let mixed = json!([
            good("t1"),
            {"ID": "t2", "ServiceID": "s1", "Slot": "two"},
            {"ID": "t3", "Status": {"State": "running"}, "DesiredState": "running"},
            good("t4")
        ])
        .to_string();
        let (ok, rejected) = tasks(mixed.as_bytes()).unwrap();
        assert_eq!(ok.iter().map(|t| &*t.id).collect::<Vec<_>>(), ["t1", "t4"]);
        let ids: Vec<_> = rejected.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["t2", "t3"]);
        assert!(
            rejected[1].reason.contains("ServiceID"),
            "{}",
            rejected[1].reason
        );
        assert!(tasks(b"{}").is_err(), "not an array: the whole read fails");
    }

    #[test]
    fn a_bad_object_is_rejected_alone() {
        let body = json!([
            {"ID": "s1", "Spec": {"Name": "web"},
             "Endpoint": {"VirtualIPs": [{"NetworkID": "n1", "Addr": "10.0.1.2/24"}]}},
            {"ID": "s2", "Spec": {"Name": "bad"},
             "Endpoint": {"VirtualIPs": [{"NetworkID": "n1", "Addr": "10.0.1.300/24"}]}},
            {"ID": "s3", "Spec": {"Name": "odd", "EndpointSpec": {"Mode": "magic"}}},
            {"Spec": {"Name": "no-id"}},
            {"ID": "s5", "Spec": {"Name": 5}}
        ])
        .to_string();
        let (ok, rejected) = list(body.as_bytes(), Kind::Service, service).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(&*ok[0].name, "web");
        let ids: Vec<_> = rejected.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["s2", "s3", "?", "s5"]);
        assert!(rejected[0].reason.contains("10.0.1.300"));
        // The reason names the field, and not where in the answer it was.
        assert_eq!(
            rejected[3].reason,
            "Spec.Name: invalid type: integer `5`, expected a string"
        );
    }

    #[test]
    fn services_read_ports_labels_and_update_state() {
        let s = service(&raw(json!({
            "ID": "s1", "Version": {"Index": 42},
            "Spec": {"Name": "web", "Labels": {"com.docker.lb.hosts": "shop.example.com"},
                     "EndpointSpec": {"Mode": "dnsrr"}},
            "Endpoint": {"Ports": [
                {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"},
                {"Protocol": "udp", "TargetPort": 53, "PublishedPort": 0, "PublishMode": "host"}
            ]},
            "UpdateStatus": {"State": "updating"}
        })))
        .unwrap();
        assert_eq!(s.mode, EndpointMode::Dnsrr);
        assert!(s.vips.is_empty());
        assert_eq!(s.labels["com.docker.lb.hosts"], "shop.example.com");
        assert_eq!(
            s.ports[0],
            PublishedPort {
                protocol: Protocol::Tcp,
                target: 80,
                published: Some(8080),
                mode: PublishMode::Ingress
            }
        );
        assert_eq!(s.ports[1].published, None);
        assert_eq!(s.ports[1].mode, PublishMode::Host);
        assert!(s.updating && s.version == 42);
        let bad_port = service(&raw(json!({"ID": "s", "Spec": {"Name": "x"},
            "Endpoint": {"Ports": [{"TargetPort": 70000}]}})));
        assert!(bad_port.unwrap_err().contains("70000"));
    }

    #[test]
    fn networks_and_nodes_read_what_the_next_datapaths_need() {
        let n = network(&raw(
            json!({"Id": "i1", "Name": "ingress", "Ingress": true, "Scope": "swarm"}),
        ))
        .unwrap();
        assert!(n.ingress && n.scope == "swarm" && !n.attachable);
        let m = node(&raw(json!({"ID": "n1", "Spec": {"Role": "manager"},
            "Status": {"State": "ready", "Addr": "192.168.100.1"},
            "ManagerStatus": {"Addr": "192.168.100.1:2377"},
            "Description": {"Hostname": "node1"}})))
        .unwrap();
        assert_eq!(m.role, Role::Manager);
        assert_eq!(m.addr, Some(Ipv4Addr::new(192, 168, 100, 1)));
        assert_eq!(m.manager_addr.as_deref(), Some("192.168.100.1:2377"));
        let w = node(&raw(
            json!({"ID": "n2", "Status": {"State": "levitating", "Addr": "0.0.0.0"}}),
        ))
        .unwrap();
        assert_eq!(
            (w.state, w.addr, w.role),
            (NodeState::Unknown, None, Role::Unknown)
        );
    }

    #[test]
    fn an_inspect_answer_gives_the_namespace_networks_and_health() {
        let i = inspect(&raw(json!({
            "Id": "c1", "Name": "/client",
            "State": {"Status": "created", "Health": {"Status": "starting"}},
            "Config": {"Hostname": "laptop", "Labels": {"com.docker.swarm.task.id": "t1"}},
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {"SandboxKey": "/var/run/docker/netns/abc", "Networks": {
                "front": {"NetworkID": "net1", "IPAddress": "10.0.1.7", "Aliases": ["cli"], "DNSNames": ["cli", "client"]},
                "back": {"NetworkID": "net0", "Aliases": null}}}
        })))
        .unwrap();
        assert_eq!((i.id.as_str(), i.name.as_str()), ("c1", "client"));
        assert_eq!(i.networks, ["net0", "net1"]);
        assert_eq!(i.endpoints["net1"].addr, Some(Ipv4Addr::new(10, 0, 1, 7)));
        assert_eq!(i.endpoints["net1"].aliases, ["cli", "client"]);
        assert_eq!(i.endpoints["net0"].addr, None);
        assert_eq!((i.health, i.task_id()), (Health::Starting, Some("t1")));
        assert!(
            i.is_live(),
            "created with a namespace: before the entrypoint runs"
        );
        let mut stopped = i.clone();
        stopped.status = "exited".into();
        assert!(!stopped.is_live());
        let host = inspect(&raw(
            json!({"Id": "h", "HostConfig": {"NetworkMode": "host"},
            "NetworkSettings": {"SandboxKey": "/var/run/docker/netns/default"}}),
        ))
        .unwrap();
        assert!(!host.is_live());
    }

    #[test]
    fn events_decode_with_their_attributes_and_bad_lines_are_errors() {
        let e = event(br#"{"Type":"network","Action":"connect","Actor":{"ID":"n1","Attributes":{"container":"c1","name":"front"}},"timeNano":5}"#).unwrap();
        assert_eq!(
            (e.kind.as_str(), e.action.as_str(), e.actor.id.as_str()),
            ("network", "connect", "n1")
        );
        assert_eq!(e.actor.attributes["container"], "c1");
        assert!(event(b"{not json").is_err());
    }

    #[test]
    fn a_list_that_is_not_an_array_is_an_error_for_the_whole_read() {
        assert!(list(b"{\"message\": \"no\"}", Kind::Task, task).is_err());
    }
}
