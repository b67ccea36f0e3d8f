//! The names every task has on a network — `<service>.<slot>.<task id>`, its short container
//! id, and the reverse name of its address — as one compact row per task, looked up by
//! taking the asked name apart. Materialized, those are three entries and a shared name per
//! task (about 210 bytes; 21 MB at 100 000 tasks); a row is 36 bytes and two indexes 8 more:
//! the task id as the 128-bit number swarm writes in 25 base-36 digits, the short container
//! id as the 6 bytes its 12 hex digits are. A task whose ids do not have that shape does not
//! fit a row: its names are materialized as before.
use std::{collections::HashMap, net::Ipv4Addr};

use serde::{Serialize, Serializer};

use crate::records::{About, Addrs, Entry, Kind, Name, What};

const ID_LEN: usize = 25;
const SHORT_LEN: usize = 12;

/// A swarm id's 25 base-36 digits as a number; None for any other text (or one too big).
fn id_value(s: &[u8]) -> Option<u128> {
    if s.len() != ID_LEN {
        return None;
    }
    s.iter().try_fold(0u128, |v, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            _ => return None,
        };
        v.checked_mul(36)?.checked_add(d as u128)
    })
}

fn id_text(mut v: u128) -> [u8; ID_LEN] {
    let mut out = [b'0'; ID_LEN];
    for b in out.iter_mut().rev() {
        let d = (v % 36) as u8;
        *b = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        v /= 36;
    }
    out
}

/// A short container id's 12 lower-case hex digits as 6 bytes.
fn short_value(s: &[u8]) -> Option<[u8; 6]> {
    if s.len() != SHORT_LEN {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 6];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}
/// The high bit of a row's slot says it holds a node index (a global service's task).
const NODE: u32 = 1 << 31;

/// What stands between the service name and the task id in a task's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A replicated service's task slot.
    Number(u32),
    /// A global service's task: its node's id, as the builder's `node` returned it.
    Node(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    /// The task id's value, big-endian (rows sort by it).
    id: [u8; 16],
    container: [u8; 6],
    has_container: bool,
    service: u32,
    slot: u32,
    ip: [u8; 4],
}

impl Row {
    fn container(&self) -> &[u8] {
        &self.container
    }

    fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip)
    }
}

/// Lower-case base-36: what swarm's ids and Docker's (hex) container ids are made of, and
/// what a normalized query can equal byte for byte.
fn plain(s: &[u8]) -> bool {
    s.iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// One network's task names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskNames {
    /// Service names as the spec gives them (answers name the task with them).
    services: Box<[Name]>,
    /// Node ids, lower-case.
    nodes: Box<[Name]>,
    /// Sorted by task id.
    rows: Box<[Row]>,
    /// Row numbers sorted by short container id (rows without one are left out).
    by_container: Box<[u32]>,
    /// Row numbers sorted by address.
    by_ip: Box<[u32]>,
}

/// Collects the rows of one network; `build` sorts them.
#[derive(Default)]
pub struct TaskNamesBuilder {
    services: Vec<Name>,
    nodes: Vec<Name>,
    node_index: HashMap<Name, u32>,
    rows: Vec<Row>,
}

impl TaskNamesBuilder {
    /// Adds a service; its tasks are pushed with the number returned.
    pub fn service(&mut self, name: &Name) -> u32 {
        self.services.push(name.clone());
        (self.services.len() - 1) as u32
    }

    /// The index of a node id for `Slot::Node`; None when the id cannot be matched byte for
    /// byte against a normalized query (the task's names are then materialized).
    pub fn node(&mut self, id: &str) -> Option<u32> {
        if id.is_empty() || !plain(id.as_bytes()) {
            return None;
        }
        if let Some(&i) = self.node_index.get(id) {
            return Some(i);
        }
        let i = self.nodes.len() as u32;
        (i < NODE).then_some(())?;
        let name: Name = id.into();
        self.nodes.push(name.clone());
        self.node_index.insert(name, i);
        Some(i)
    }

    /// Adds one task; false (nothing added) when its ids do not fit a row.
    pub fn push(
        &mut self,
        service: u32,
        slot: Slot,
        id: &str,
        container: Option<&str>,
        ip: Ipv4Addr,
    ) -> bool {
        let slot = match slot {
            Slot::Number(n) if n > 0 && n < NODE => n,
            Slot::Node(i) if (i as usize) < self.nodes.len() => i | NODE,
            _ => return false,
        };
        let Some(id) = id_value(id.as_bytes()) else {
            return false;
        };
        let container = match container {
            None => None,
            Some(c) => match short_value(c.as_bytes()) {
                Some(c) => Some(c),
                None => return false,
            },
        };
        if service as usize >= self.services.len() {
            return false;
        }
        self.rows.push(Row {
            id: id.to_be_bytes(),
            container: container.unwrap_or_default(),
            has_container: container.is_some(),
            service,
            slot,
            ip: ip.octets(),
        });
        true
    }

    /// The table. Where two rows claim one name (a task id or a short container id seen
    /// twice), the first pushed keeps it, as the first claim on any name does.
    pub fn build(self) -> TaskNames {
        // Each row's push order breaks ties, so dedup keeps the first claim.
        let mut rows: Vec<(Row, u32)> = self.rows.into_iter().zip(0..).collect();
        rows.sort_unstable_by(|(a, i), (b, j)| (a.id, i).cmp(&(b.id, j)));
        rows.dedup_by(|later, first| later.0.id == first.0.id);
        let index = |keep: &dyn Fn(&Row) -> bool, key: &dyn Fn(&Row) -> &[u8]| -> Box<[u32]> {
            let mut at: Vec<u32> = (0..rows.len() as u32)
                .filter(|&i| keep(&rows[i as usize].0))
                .collect();
            at.sort_unstable_by(|&a, &b| {
                let (ra, sa) = &rows[a as usize];
                let (rb, sb) = &rows[b as usize];
                (key(ra), sa).cmp(&(key(rb), sb))
            });
            at.dedup_by(|b, a| key(&rows[*b as usize].0) == key(&rows[*a as usize].0));
            at.into_boxed_slice()
        };
        let by_container = index(&|r| r.has_container, &Row::container);
        let by_ip = index(&|_| true, &|r| &r.ip[..]);
        TaskNames {
            services: self.services.into_boxed_slice(),
            nodes: self.nodes.into_boxed_slice(),
            rows: rows.into_iter().map(|(r, _)| r).collect(),
            by_container,
            by_ip,
        }
    }
}

impl TaskNames {
    pub fn builder() -> TaskNamesBuilder {
        TaskNamesBuilder::default()
    }

    /// Tasks in the table.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Names the table answers (a task name each, and a short container id each).
    pub fn names(&self) -> usize {
        self.rows.len() + self.by_container.len()
    }

    /// The entry for a normalized (lower-case, no trailing dot) name.
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        if let Some(r) = self.by_name(key) {
            return Some(self.entry(r, What::Task));
        }
        self.by_container(key)
            .map(|r| self.entry(r, What::TaskContainerId))
    }

    /// Whether a normalized name is one of the table's (materialized names must not shadow
    /// it).
    pub fn claims(&self, key: &str) -> bool {
        self.by_name(key).is_some() || self.by_container(key).is_some()
    }

    /// The task name (lower-case, unqualified) of the task at `ip`.
    pub fn reverse(&self, ip: Ipv4Addr) -> Option<String> {
        Some(self.name(self.at(ip)?).to_ascii_lowercase())
    }

    /// Whether a task of the table has address `ip` (its reverse name is the table's).
    pub fn has_addr(&self, ip: Ipv4Addr) -> bool {
        self.at(ip).is_some()
    }

    fn at(&self, ip: Ipv4Addr) -> Option<&Row> {
        let at = self
            .by_ip
            .binary_search_by_key(&ip.octets(), |&i| self.rows[i as usize].ip)
            .ok()?;
        Some(&self.rows[self.by_ip[at] as usize])
    }

    /// Every task address in the table.
    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.rows.iter().map(Row::ip)
    }

    fn by_name(&self, key: &str) -> Option<&Row> {
        let (rest, id) = key.rsplit_once('.')?;
        let id = id_value(id.as_bytes())?.to_be_bytes();
        let at = self.rows.binary_search_by(|r| r.id.cmp(&id)).ok()?;
        let row = &self.rows[at];
        let (service, slot) = rest.rsplit_once('.')?;
        (service.eq_ignore_ascii_case(&self.services[row.service as usize])
            && self.slot_text(row) == slot)
            .then_some(row)
    }

    fn by_container(&self, key: &str) -> Option<&Row> {
        let short = short_value(key.as_bytes())?;
        let at = self
            .by_container
            .binary_search_by(|&i| self.rows[i as usize].container.cmp(&short))
            .ok()?;
        Some(&self.rows[self.by_container[at] as usize])
    }

    fn slot_text(&self, row: &Row) -> String {
        if row.slot & NODE != 0 {
            self.nodes[(row.slot & !NODE) as usize].to_string()
        } else {
            row.slot.to_string()
        }
    }

    /// The task's name as Docker names its container.
    fn name(&self, row: &Row) -> String {
        let id = id_text(u128::from_be_bytes(row.id));
        let id = std::str::from_utf8(&id).expect("base-36 digits");
        format!(
            "{}.{}.{id}",
            self.services[row.service as usize],
            self.slot_text(row)
        )
    }

    fn entry(&self, row: &Row, what: What) -> Entry {
        Entry {
            kind: Kind::Endpoint,
            shuffle: false,
            addrs: Addrs::One(row.ip()),
            about: About {
                what,
                of: self.name(row).into(),
            },
        }
    }
}

/// As the materialized names would list them: `name → address`, for dumps.
impl Serialize for TaskNames {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.rows.iter().map(|r| (self.name(r), r.ip())))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    const T1: &str = "aaaaaaaaaaaaaaaaaaaaaaaa1";
    const T2: &str = "bbbbbbbbbbbbbbbbbbbbbbbb2";

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, last)
    }

    fn table() -> TaskNames {
        let mut b = TaskNames::builder();
        let web = b.service(&"Web".into());
        let agent = b.service(&"agent".into());
        let node = b.node("node0000000000000000000001").unwrap();
        assert!(b.push(web, Slot::Number(1), T1, Some("c0ffee000001"), ip(3)));
        assert!(b.push(agent, Slot::Node(node), T2, Some("c0ffee000002"), ip(4)));
        b.build()
    }

    #[test]
    fn task_names_and_container_ids_resolve_to_their_task() {
        let t = table();
        let e = t.lookup(&format!("web.1.{T1}")).unwrap();
        assert_eq!(e.addrs, [ip(3)]);
        assert_eq!(e.about(""), format!("task Web.1.{T1}"));
        let g = t
            .lookup(&format!("agent.node0000000000000000000001.{T2}"))
            .unwrap();
        assert_eq!(g.addrs, [ip(4)]);
        let c = t.lookup("c0ffee000002").unwrap();
        assert_eq!(c.addrs, [ip(4)]);
        assert_eq!(c.about.what, What::TaskContainerId);
        assert_eq!(t.names(), 4);
        assert_eq!(t.reverse(ip(3)).unwrap(), format!("web.1.{T1}"));
        assert_eq!(t.reverse(ip(9)), None);
    }

    #[test]
    fn a_name_must_match_service_and_slot_too() {
        let t = table();
        for wrong in [
            format!("web.2.{T1}"),
            format!("web.01.{T1}"),
            format!("api.1.{T1}"),
            format!("1.{T1}"),
            T1.to_string(),
            format!("agent.node0000000000000000000002.{T2}"),
            "c0ffee00000".to_string(),
        ] {
            assert!(t.lookup(&wrong).is_none(), "{wrong}");
            assert!(!t.claims(&wrong), "{wrong}");
        }
    }

    #[test]
    fn ids_without_swarms_shape_are_left_to_the_caller() {
        let mut b = TaskNames::builder();
        let s = b.service(&"web".into());
        assert!(!b.push(s, Slot::Number(1), "short", None, ip(3)));
        assert!(!b.push(s, Slot::Number(1), &T1.to_uppercase(), None, ip(3)));
        assert!(!b.push(s, Slot::Number(1), T1, Some("C0FFEE000001"), ip(3)));
        assert!(
            !b.push(s, Slot::Number(1), T1, Some("c0ffee"), ip(3)),
            "not 12 digits"
        );
        assert!(
            !b.push(s, Slot::Number(1), T1, Some("c0ffee00000g"), ip(3)),
            "not hex"
        );
        // 25 base-36 digits can say more than 128 bits; swarm's never do.
        assert!(!b.push(s, Slot::Number(1), &"z".repeat(25), None, ip(3)));
        assert!(!b.push(s, Slot::Number(0), T1, None, ip(3)));
        assert!(!b.push(s, Slot::Node(7), T1, None, ip(3)));
        assert!(!b.push(s + 1, Slot::Number(1), T1, None, ip(3)));
        assert!(b.node("Node1").is_none());
        assert!(b.build().is_empty());
    }

    proptest! {
        /// The table answers exactly what materialized names, first claim first, would:
        /// for every name and address, with ids drawn so that they collide.
        #[test]
        fn the_table_answers_as_materialized_names_would(
            tasks in prop::collection::vec(
                (0u32..2, 1u32..3, "[ab]", prop::option::of("c0ffee00000[0-2]"), 0u8..4),
                0..16,
            ),
        ) {
            let services = ["web", "db"];
            let mut b = TaskNames::builder();
            for s in services {
                b.service(&s.into());
            }
            let (mut names, mut ptr) = (BTreeMap::new(), BTreeMap::new());
            let mut seen = BTreeSet::new();
            for (service, slot, tail, container, last) in &tasks {
                let id = format!("{}{tail}", "1".repeat(24));
                prop_assert!(b.push(*service, Slot::Number(*slot), &id, container.as_deref(), ip(*last)));
                if !seen.insert(id.clone()) {
                    continue;
                }
                let name = format!("{}.{slot}.{id}", services[*service as usize]);
                names.entry(name.clone()).or_insert(ip(*last));
                if let Some(c) = container {
                    names.entry(c.clone()).or_insert(ip(*last));
                }
                ptr.entry(ip(*last)).or_insert(name);
            }
            let t = b.build();
            let mut asked: BTreeSet<String> = names.keys().cloned().collect();
            asked.extend(["web.1.".to_string() + &"1".repeat(24) + "c", "c0ffee000003".into(), "db.3.x".into()]);
            for name in &asked {
                let got = t.lookup(name).map(|e| e.addrs[0]);
                prop_assert_eq!(got, names.get(name).copied(), "{}", name);
                prop_assert_eq!(t.claims(name), names.contains_key(name));
            }
            for last in 0..5 {
                prop_assert_eq!(t.reverse(ip(last)), ptr.get(&ip(last)).cloned());
            }
            prop_assert_eq!(t.names(), names.len());
        }
    }

    #[test]
    fn ids_and_container_ids_round_trip_through_their_numbers() {
        for id in [
            T1,
            T2,
            "0000000000000000000000000",
            "f1ldgxyv2o6cy6qu1tu1jf7lf",
        ] {
            let v = id_value(id.as_bytes()).unwrap();
            assert_eq!(&id_text(v)[..], id.as_bytes());
        }
        assert_eq!(
            short_value(b"0123456789ab"),
            Some([0x01, 0x23, 0x45, 0x67, 0x89, 0xab])
        );
        assert_eq!(id_value(b"tooshort"), None);
    }

    #[test]
    fn the_first_claim_on_a_name_keeps_it() {
        let mut b = TaskNames::builder();
        let s = b.service(&"web".into());
        assert!(b.push(s, Slot::Number(1), T2, Some("c0ffee000000"), ip(3)));
        assert!(b.push(s, Slot::Number(2), T2, None, ip(4)));
        assert!(b.push(s, Slot::Number(3), T1, Some("c0ffee000000"), ip(5)));
        let t = b.build();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(&format!("web.1.{T2}")).unwrap().addrs, [ip(3)]);
        assert!(t.lookup(&format!("web.2.{T2}")).is_none());
        assert_eq!(t.lookup("c0ffee000000").unwrap().addrs, [ip(3)]);
    }
}
