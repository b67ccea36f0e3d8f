//! The names meshd answers, per network, and the lookup that scopes them to the networks of
//! the asking container. Plain data, no I/O: meshd's `compile` builds `Zones` from the same
//! cluster state that drives the datapath, so DNS never names a task the datapath dropped.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    ops::Deref,
    sync::Arc,
};

use serde::{Serialize, Serializer};

use crate::task_names::TaskNames;

/// A name, shared: a task's name is the key of its entry, what its other entries are about,
/// and its reverse name, in one allocation (a cluster has a hundred thousand of them).
pub type Name = Arc<str>;

/// What kind of name an entry is: it decides the TTL and whether answers are shuffled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// A vip-mode service name: its VIP on this network.
    ServiceVip,
    /// A dnsrr-mode service name: its live task addresses, shuffled per answer.
    ServiceDnsrr,
    /// `tasks.<service>`: live task addresses, shuffled per answer.
    Tasks,
    /// A task or container name, hostname, or network alias: one endpoint.
    Endpoint,
    /// A service alias (vip or dnsrr, as its service).
    Alias,
}

impl Kind {
    /// Seconds a resolver may cache the answer. A VIP only changes when the service is
    /// recreated, so it may be cached a while; task lists change with every scale or
    /// failure, so they must not outlive the change by more than a moment (Docker answers
    /// 600 s for everything, which keeps clients on dead tasks for ten minutes).
    pub fn ttl(self, shuffled: bool) -> u32 {
        match self {
            _ if shuffled => 1,
            Kind::ServiceVip | Kind::Alias => 30,
            Kind::Endpoint => 5,
            Kind::ServiceDnsrr | Kind::Tasks => 1,
        }
    }
}

/// One name on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub kind: Kind,
    pub shuffle: bool,
    /// In answer order (shuffled at answer time when `shuffle`).
    pub addrs: Addrs,
    /// What the entry stands for, for `meshctl dns` ("service web", "task web.1.abc").
    pub about: About,
}

impl Entry {
    /// What the entry named `name` stands for, in words.
    pub fn about(&self, name: &str) -> String {
        let (of, n) = (&self.about.of, self.addrs.len());
        let service = if self.shuffle {
            format!("service {of} (dnsrr, {n} live tasks)")
        } else {
            format!("service {of} (VIP)")
        };
        match self.about.what {
            What::Service => service,
            What::ServiceAlias => format!("alias {name} of {service}"),
            What::Tasks => format!("live tasks of service {of}"),
            What::Task => format!("task {of}"),
            What::TaskHostname => format!("task {of} (hostname)"),
            What::TaskContainerId => format!("task {of} (container id)"),
            What::Container => format!("container {of}"),
            What::ContainerAlias => format!("alias {name} of container {of}"),
            What::ContainerId => format!("container {of} (id)"),
            What::ContainerHostname => format!("container {of} (hostname)"),
            What::Named => of.to_string(),
        }
    }
}

/// What an entry stands for: the object (`of`) and which of its names this is. Words are
/// made when asked for, so a hundred thousand names do not each carry a sentence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct About {
    pub what: What,
    pub of: Name,
}

impl About {
    pub fn new(what: What, of: &Name) -> About {
        About {
            what,
            of: of.clone(),
        }
    }
}

/// Free text (tests, examples).
impl From<&str> for About {
    fn from(s: &str) -> About {
        About {
            what: What::Named,
            of: s.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum What {
    /// A service's name (VIP or dnsrr, as the entry's `shuffle` says).
    Service,
    ServiceAlias,
    /// `tasks.<service>`.
    Tasks,
    Task,
    TaskHostname,
    TaskContainerId,
    Container,
    ContainerAlias,
    ContainerId,
    ContainerHostname,
    /// `of` says it all.
    Named,
}

/// An entry's addresses: one, inline (every task and container name), or a list.
#[derive(Clone, PartialEq, Eq)]
pub enum Addrs {
    One(Ipv4Addr),
    Many(Box<[Ipv4Addr]>),
}

impl Deref for Addrs {
    type Target = [Ipv4Addr];
    fn deref(&self) -> &[Ipv4Addr] {
        match self {
            Addrs::One(a) => std::slice::from_ref(a),
            Addrs::Many(v) => v,
        }
    }
}

impl From<Vec<Ipv4Addr>> for Addrs {
    fn from(v: Vec<Ipv4Addr>) -> Addrs {
        match v[..] {
            [a] => Addrs::One(a),
            _ => Addrs::Many(v.into_boxed_slice()),
        }
    }
}

impl FromIterator<Ipv4Addr> for Addrs {
    fn from_iter<I: IntoIterator<Item = Ipv4Addr>>(iter: I) -> Addrs {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl<'a> IntoIterator for &'a Addrs {
    type Item = &'a Ipv4Addr;
    type IntoIter = std::slice::Iter<'a, Ipv4Addr>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<const N: usize> PartialEq<[Ipv4Addr; N]> for Addrs {
    fn eq(&self, other: &[Ipv4Addr; N]) -> bool {
        **self == other[..]
    }
}

impl PartialEq<Vec<Ipv4Addr>> for Addrs {
    fn eq(&self, other: &Vec<Ipv4Addr>) -> bool {
        **self == other[..]
    }
}

impl fmt::Debug for Addrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Addrs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// A reverse name: a task's is qualified with its network (`web.1.abc.front`), a VIP's is
/// the bare service name, as Docker answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ptr {
    pub name: Name,
    pub qualified: bool,
}

impl From<&str> for Ptr {
    fn from(s: &str) -> Ptr {
        Ptr {
            name: s.into(),
            qualified: false,
        }
    }
}

/// The names of one network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetworkRecords {
    pub id: String,
    /// Lower-case; `<name>.<network>` is accepted as a qualified form.
    pub name: String,
    /// No names from outside: nothing is forwarded for a container only on internal networks.
    pub internal: bool,
    /// Lower-case names without a trailing dot. A task's own names are in `tasks`; these
    /// never shadow them.
    pub names: BTreeMap<Name, Entry>,
    /// Reverse names: VIPs name their service, containers themselves (task addresses are
    /// in `tasks`, which answers first).
    pub ptr: BTreeMap<Ipv4Addr, Ptr>,
    /// Every task's name, short container id and reverse name, compact.
    pub tasks: TaskNames,
}

impl NetworkRecords {
    /// The entry for a normalized name on this network.
    pub fn get<'a>(&'a self, key: &str) -> Option<(Cow<'a, str>, Cow<'a, Entry>)> {
        if let Some((k, e)) = self.names.get_key_value(key) {
            return Some((Cow::Borrowed(&**k), Cow::Borrowed(e)));
        }
        let e = self.tasks.lookup(key)?;
        Some((Cow::Owned(key.to_string()), Cow::Owned(e)))
    }

    /// How many names the network answers.
    pub fn len(&self) -> usize {
        self.names.len() + self.tasks.names()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every network's names (by network id). Each network's records are shared, so a change
/// on one network rebuilds that network only and copying `Zones` copies pointers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Zones {
    pub networks: BTreeMap<String, Arc<NetworkRecords>>,
}

/// Where a name was found, for the answer and for `meshctl dns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Found<'a> {
    pub network: &'a str,
    pub name: Cow<'a, str>,
    pub entry: Cow<'a, Entry>,
}

/// A query name as a lookup key: lower-case, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zones {
    /// The entry for `name` as seen from a container attached to `networks` (ids, in the
    /// container's order: the first network that has the name answers, as Docker does).
    pub fn lookup<'a>(&'a self, name: &str, networks: &[String]) -> Option<Found<'a>> {
        let key = normalize(name);
        for id in networks {
            let Some(net) = self.networks.get(id) else {
                continue;
            };
            if let Some((name, entry)) = net.get(&key) {
                return Some(Found {
                    network: &net.name,
                    name,
                    entry,
                });
            }
            // `<name>.<network>`
            if let Some(short) = key
                .strip_suffix(net.name.as_str())
                .and_then(|s| s.strip_suffix('.'))
            {
                if let Some((name, entry)) = net.get(short) {
                    return Some(Found {
                        network: &net.name,
                        name,
                        entry,
                    });
                }
            }
        }
        None
    }

    /// The reverse name of `ip` as seen from a container attached to `networks`: the
    /// network's name and the name.
    pub fn reverse(&self, ip: Ipv4Addr, networks: &[String]) -> Option<(&str, String)> {
        networks.iter().find_map(|id| {
            let net = self.networks.get(id)?;
            let name = match (net.tasks.reverse(ip), net.ptr.get(&ip)) {
                (Some(task), _) => format!("{task}.{}", net.name),
                (None, Some(p)) if p.qualified => format!("{}.{}", p.name, net.name),
                (None, Some(p)) => p.name.to_string(),
                (None, None) => return None,
            };
            Some((net.name.as_str(), name))
        })
    }

    /// Whether names that are not ours may be forwarded upstream for this container: not
    /// when every network it is on is internal.
    pub fn may_forward(&self, networks: &[String]) -> bool {
        networks.is_empty()
            || networks
                .iter()
                .any(|id| self.networks.get(id).is_none_or(|n| !n.internal))
    }
}

/// `d.c.b.a.in-addr.arpa` → a.b.c.d; None for anything else.
pub fn parse_reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let key = normalize(name);
    let rest = key.strip_suffix(".in-addr.arpa")?;
    let parts: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse::<u8>().ok())
        .collect::<Option<_>>()?;
    match parts[..] {
        [d, c, b, a] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// Whether `ip` belongs to one of `networks` in `zones` (an answer may only carry these).
pub fn visible(zones: &Zones, ip: IpAddr, networks: &[String]) -> bool {
    let IpAddr::V4(ip) = ip else { return false };
    networks.iter().any(|id| {
        zones.networks.get(id).is_some_and(|n| {
            n.names.values().any(|e| e.addrs.contains(&ip))
                || n.ptr.contains_key(&ip)
                || n.tasks.addrs().any(|a| a == ip)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(kind: Kind, addrs: &[[u8; 4]]) -> Entry {
        Entry {
            kind,
            addrs: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            shuffle: matches!(kind, Kind::ServiceDnsrr | Kind::Tasks),
            about: "".into(),
        }
    }

    fn zones() -> Zones {
        let mut front = NetworkRecords {
            id: "n1".into(),
            name: "front".into(),
            ..Default::default()
        };
        front
            .names
            .insert("web".into(), entry(Kind::ServiceVip, &[[10, 0, 1, 2]]));
        front.names.insert(
            "tasks.web".into(),
            entry(Kind::Tasks, &[[10, 0, 1, 3], [10, 0, 1, 4]]),
        );
        front.ptr.insert(Ipv4Addr::new(10, 0, 1, 2), "web".into());
        let mut back = NetworkRecords {
            id: "n2".into(),
            name: "back".into(),
            internal: true,
            ..Default::default()
        };
        back.names
            .insert("db".into(), entry(Kind::ServiceVip, &[[10, 0, 2, 2]]));
        back.names
            .insert("web".into(), entry(Kind::ServiceVip, &[[10, 0, 2, 9]]));
        Zones {
            networks: [
                ("n1".into(), Arc::new(front)),
                ("n2".into(), Arc::new(back)),
            ]
            .into(),
        }
    }

    #[test]
    fn names_are_case_insensitive_and_qualified_names_pick_the_network() {
        let z = zones();
        let both = ["n1".to_string(), "n2".to_string()];
        assert_eq!(z.lookup("WEB.", &both).unwrap().network, "front");
        assert_eq!(
            z.lookup("web.back", &both).unwrap().entry.addrs[0],
            Ipv4Addr::new(10, 0, 2, 9)
        );
        assert_eq!(
            z.lookup("Tasks.Web.Front", &both)
                .unwrap()
                .entry
                .addrs
                .len(),
            2
        );
        assert!(z.lookup("db.front", &both).is_none());
    }

    #[test]
    fn a_container_sees_only_its_networks() {
        let z = zones();
        let front = ["n1".to_string()];
        assert!(z.lookup("db", &front).is_none());
        assert!(z.lookup("db.back", &front).is_none());
        assert!(z
            .reverse(Ipv4Addr::new(10, 0, 1, 2), &["n2".into()])
            .is_none());
        assert_eq!(
            z.reverse(Ipv4Addr::new(10, 0, 1, 2), &front),
            Some(("front", "web".to_string()))
        );
    }

    #[test]
    fn nothing_is_forwarded_for_a_container_only_on_internal_networks() {
        let z = zones();
        assert!(!z.may_forward(&["n2".into()]));
        assert!(z.may_forward(&["n2".into(), "n1".into()]));
    }

    #[test]
    fn reverse_names_parse_only_when_well_formed() {
        assert_eq!(
            parse_reverse_v4("2.1.0.10.in-addr.arpa."),
            Some(Ipv4Addr::new(10, 0, 1, 2))
        );
        assert_eq!(parse_reverse_v4("1.0.10.in-addr.arpa"), None);
        assert_eq!(parse_reverse_v4("300.1.0.10.in-addr.arpa"), None);
        assert_eq!(parse_reverse_v4("2.1.0.10.ip6.arpa"), None);
    }

    #[test]
    fn task_lists_live_one_second_and_vips_longer() {
        assert_eq!(Kind::Tasks.ttl(true), 1);
        assert_eq!(Kind::ServiceDnsrr.ttl(true), 1);
        assert!(Kind::ServiceVip.ttl(false) > Kind::Endpoint.ttl(false));
    }

    fn arb_zones() -> impl Strategy<Value = Zones> {
        // Up to 4 networks with up to 6 names from a small alphabet (so names collide
        // across networks), each with addresses inside that network's own /24.
        prop::collection::vec(
            prop::collection::btree_map("[a-c]{1,2}", 1usize..4, 0..6),
            1..4,
        )
        .prop_map(|nets| {
            let mut z = Zones::default();
            for (i, names) in nets.into_iter().enumerate() {
                let mut n = NetworkRecords {
                    id: format!("n{i}"),
                    name: format!("net{i}"),
                    ..Default::default()
                };
                for (j, (name, count)) in names.into_iter().enumerate() {
                    let addrs: Vec<[u8; 4]> = (0..count)
                        .map(|k| [10, i as u8, j as u8, k as u8 + 2])
                        .collect();
                    let e = entry(Kind::Endpoint, &addrs);
                    for a in &e.addrs {
                        n.ptr.insert(*a, name.as_str().into());
                    }
                    n.names.insert(name.into(), e);
                }
                z.networks.insert(n.id.clone(), Arc::new(n));
            }
            z
        })
    }

    proptest! {
        /// Whatever the names, a container never gets an address or a reverse name from a
        /// network it is not attached to.
        #[test]
        fn answers_never_leave_the_askers_networks(
            z in arb_zones(),
            attached in prop::collection::btree_set(0usize..4, 0..4),
            name in "[a-c]{1,2}(\\.net[0-3])?",
            ip in (0u8..4, 0u8..6, 2u8..5),
        ) {
            let nets: Vec<String> = attached.iter().map(|i| format!("n{i}")).collect();
            if let Some(found) = z.lookup(&name, &nets) {
                let owner = z.networks.values().find(|n| n.name == found.network).unwrap();
                prop_assert!(nets.contains(&owner.id));
                for a in &found.entry.addrs {
                    prop_assert!(a.octets()[1] as usize == owner.id[1..].parse::<usize>().unwrap());
                    prop_assert!(visible(&z, IpAddr::V4(*a), &nets));
                }
            }
            let addr = Ipv4Addr::new(10, ip.0, ip.1, ip.2);
            if let Some((net, _)) = z.reverse(addr, &nets) {
                let owner = z.networks.values().find(|n| n.name == net).unwrap();
                prop_assert!(nets.contains(&owner.id));
            }
        }
    }
}
