//! `Tasks`: the live tasks, kept by service. Compile, DNS and the feed read a service's
//! tasks together, so they sit together, sorted by id, in one exact-size list per service;
//! reading a service's tasks is a slice, not a lookup per task.
//!
//! One task is found by id through a table of 8-byte entries: 32 bits of the id's hash and
//! the slot of its service's list. The table holds no id (the list does), so a hash seen
//! twice is told apart by looking in the lists. At 100 000 tasks it is about 1.2 MB, where
//! a map from task id to service id was 4.3 MB (`bench control`).
use std::{collections::BTreeMap, hash::BuildHasher};

use hashbrown::HashTable;

use super::{
    objects::{Id, Task},
    TaskId,
};

#[derive(Clone, Debug, Default)]
pub struct Tasks {
    /// Each service's tasks, by slot; a slot is reused once its list empties.
    lists: Vec<(Id, Vec<Task>)>,
    free: Vec<u32>,
    /// Service id → slot, in service order.
    slots: BTreeMap<Id, u32>,
    /// (the task id's hash, high 32 bits; its service's slot), one per task.
    by_id: HashTable<(u32, u32)>,
    hasher: foldhash::fast::RandomState,
    /// Tests: every id hashes alike, so every lookup takes the path a shared hash takes.
    #[cfg(test)]
    collide: bool,
}

impl PartialEq for Tasks {
    /// The tasks (slots and the table follow from them).
    fn eq(&self, o: &Self) -> bool {
        // A list reserved but not filled (`reserve`) holds no task.
        fn filled(t: &Tasks) -> impl Iterator<Item = (&Id, &Vec<Task>)> + '_ {
            t.slots
                .values()
                .map(|&s| {
                    let (id, list) = &t.lists[s as usize];
                    (id, list)
                })
                .filter(|(_, l)| !l.is_empty())
        }
        filled(self).eq(filled(o))
    }
}

fn find(list: &[Task], id: &str) -> Result<usize, usize> {
    list.binary_search_by(|t| (*t.id).cmp(id))
}

/// The table's hash of an entry's 32 bits: spread over the 64 that hashbrown reads (its
/// top bits pick the tag, its low bits the bucket).
fn spread(h: u32) -> u64 {
    u64::from(h) * 0x1_0000_0001
}

/// Whether a table entry is task `id`'s (hash `h`): its hash bits match and its list
/// holds the id.
fn is_entry<'a>(
    lists: &'a [(Id, Vec<Task>)],
    h: u32,
    id: &'a str,
) -> impl Fn(&(u32, u32)) -> bool + 'a {
    move |&(eh, slot)| eh == h && find(&lists[slot as usize].1, id).is_ok()
}

impl Tasks {
    fn hash(&self, id: &str) -> u32 {
        #[cfg(test)]
        if self.collide {
            return 7;
        }
        (self.hasher.hash_one(id) >> 32) as u32
    }

    /// The slot of the list that holds task `id`, whose hash is `h`.
    fn slot_of(&self, h: u32, id: &str) -> Option<u32> {
        self.by_id
            .find(spread(h), is_entry(&self.lists, h, id))
            .map(|&(_, slot)| slot)
    }

    /// `service_id`'s slot, made (or reused) when it has none.
    fn slot_for(&mut self, service_id: &Id) -> u32 {
        if let Some(&s) = self.slots.get(service_id) {
            return s;
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.lists[s as usize] = (service_id.clone(), Vec::new());
                s
            }
            None => {
                self.lists.push((service_id.clone(), Vec::new()));
                (self.lists.len() - 1) as u32
            }
        };
        self.slots.insert(service_id.clone(), s);
        s
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Task> {
        let list = &self.lists[self.slot_of(self.hash(id), id)? as usize].1;
        find(list, id).ok().map(|i| &list[i])
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.slot_of(self.hash(id), id).is_some()
    }

    /// A service's tasks, sorted by id.
    pub fn of_service(&self, service_id: &str) -> &[Task] {
        self.slots
            .get(service_id)
            .map_or(&[], |&s| &self.lists[s as usize].1)
    }

    /// Room for `n` tasks in `service_id`'s list, taken at once: a service's tasks arrive
    /// together, and growing the list one slot per task moved it once per task.
    pub fn reserve(&mut self, service_id: &Id, n: usize) {
        if n == 0 {
            return;
        }
        let s = self.slot_for(service_id);
        let list = &mut self.lists[s as usize].1;
        list.reserve_exact(n.saturating_sub(list.len()));
        self.by_id.reserve(n, |&(h, _)| spread(h));
    }

    /// Puts `t` in (replacing the task with its id), and returns the one it replaced. A
    /// task never changes service; one that claims to is moved.
    pub fn insert(&mut self, t: Task) -> Option<Task> {
        let h = self.hash(&t.id);
        let old = match self.slot_of(h, &t.id) {
            Some(s) if self.lists[s as usize].0 == t.service_id => {
                let list = &mut self.lists[s as usize].1;
                let i = find(list, &t.id).expect("the table points at its list");
                return Some(std::mem::replace(&mut list[i], t));
            }
            Some(_) => self.remove(&t.id),
            None => None,
        };
        let s = self.slot_for(&t.service_id);
        let list = &mut self.lists[s as usize].1;
        let i = find(list, &t.id).expect_err("not in the table, so not in its list");
        // One more slot, not a doubling: a service's task list is read far more often
        // than it grows, and stays at its size.
        list.reserve_exact(1);
        list.insert(i, t);
        self.by_id
            .insert_unique(spread(h), (h, s), |&(h, _)| spread(h));
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<Task> {
        let h = self.hash(id);
        let entry = self
            .by_id
            .find_entry(spread(h), is_entry(&self.lists, h, id))
            .ok()?;
        let ((_, s), _) = entry.remove();
        let (service, list) = &mut self.lists[s as usize];
        let i = find(list, id).expect("the table pointed at this list");
        let t = list.remove(i);
        if list.is_empty() {
            self.slots.remove(&**service);
            // Free the list's room; the slot's id stays until `slot_for` reuses it.
            *list = Vec::new();
            self.free.push(s);
        } else if list.capacity() > list.len() + list.len() / 4 {
            list.shrink_to_fit();
        }
        Some(t)
    }

    /// Every task, by service then id.
    pub fn values(&self) -> impl Iterator<Item = &Task> + '_ {
        self.slots
            .values()
            .flat_map(|&s| self.lists[s as usize].1.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &TaskId> + '_ {
        self.values().map(|t| &t.id)
    }
}

impl std::ops::Index<&str> for Tasks {
    type Output = Task;
    fn index(&self, id: &str) -> &Task {
        self.get(id).expect("no task with that id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state_tests::task;
    use proptest::prelude::*;

    #[test]
    fn a_reserved_list_holds_nothing_until_filled() {
        let mut tasks = Tasks::default();
        tasks.reserve(&"s1".into(), 10);
        assert_eq!(tasks, Tasks::default());
        assert!(tasks.of_service("s1").is_empty());
        let t = task("t1", "s1", "n", "net", [10, 0, 0, 1]);
        tasks.insert(t.clone());
        assert_eq!(tasks.of_service("s1"), &[t][..]);
        assert_ne!(tasks, Tasks::default());
    }

    proptest! {
        /// Whatever is put in and taken out, `Tasks` answers as a map by task id does.
        #[test]
        fn tasks_answer_as_a_map_by_id(
            ops in prop::collection::vec((any::<bool>(), 0u8..12, 0u8..3, 0u8..5), 0..60),
            collide in any::<bool>(),
        ) {
            let mut tasks = Tasks { collide, ..Tasks::default() };
            let mut model: BTreeMap<String, Task> = BTreeMap::new();
            for (put, id, svc, ip) in ops {
                let id = format!("t{id}");
                if put {
                    let t = task(&id, &format!("s{svc}"), "n", "net", [10, 0, 0, ip]);
                    prop_assert_eq!(tasks.insert(t.clone()), model.insert(id, t));
                } else {
                    prop_assert_eq!(tasks.remove(&id), model.remove(&id));
                }
                prop_assert_eq!(tasks.len(), model.len());
            }
            for i in 0..12 {
                let id = format!("t{i}");
                prop_assert_eq!(tasks.get(&id), model.get(&id));
                prop_assert_eq!(tasks.contains_key(&id), model.contains_key(&id));
            }
            for s in ["s0", "s1", "s2"] {
                let want: Vec<&Task> = model.values().filter(|t| &*t.service_id == s).collect();
                let got: Vec<&Task> = tasks.of_service(s).iter().collect();
                prop_assert_eq!(got, want);
            }
            prop_assert_eq!(tasks.values().count(), model.len());
        }
    }
}
