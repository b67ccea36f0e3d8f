//! `Tasks`: the live tasks, kept by service. Compile, DNS and the feed read a service's
//! tasks together, so they sit together, sorted by id, in one exact-size list per service;
//! a map from task id to service finds one task. At 100 000 tasks this is a third smaller
//! than a map by task id plus a by-service index, and reading a service's tasks is a slice,
//! not a lookup per task.
use std::collections::{BTreeMap, HashMap};

use super::objects::{Id, Task};

#[derive(Clone, Debug, Default)]
pub struct Tasks {
    by_service: BTreeMap<Id, Vec<Task>>,
    service_of: HashMap<Id, Id, foldhash::fast::RandomState>,
}

impl PartialEq for Tasks {
    /// The tasks (`service_of` follows from them).
    fn eq(&self, o: &Self) -> bool {
        // A list reserved but not filled (`reserve`) holds no task.
        fn filled(t: &Tasks) -> impl Iterator<Item = (&Id, &Vec<Task>)> + '_ {
            t.by_service.iter().filter(|(_, l)| !l.is_empty())
        }
        filled(self).eq(filled(o))
    }
}

fn find(list: &[Task], id: &str) -> Result<usize, usize> {
    list.binary_search_by(|t| (*t.id).cmp(id))
}

impl Tasks {
    pub fn len(&self) -> usize {
        self.service_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.service_of.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Task> {
        let list = self.by_service.get(&**self.service_of.get(id)?)?;
        find(list, id).ok().map(|i| &list[i])
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.service_of.contains_key(id)
    }

    /// A service's tasks, sorted by id.
    pub fn of_service(&self, service_id: &str) -> &[Task] {
        self.by_service.get(service_id).map_or(&[], Vec::as_slice)
    }

    /// Room for `n` tasks in `service_id`'s list, taken at once: a service's tasks arrive
    /// together, and growing the list one slot per task moved it once per task.
    pub fn reserve(&mut self, service_id: &Id, n: usize) {
        if n == 0 {
            return;
        }
        let list = self.by_service.entry(service_id.clone()).or_default();
        list.reserve_exact(n.saturating_sub(list.len()));
    }

    /// Puts `t` in (replacing the task with its id), and returns the one it replaced. A
    /// task never changes service; one that claims to is moved.
    pub fn insert(&mut self, t: Task) -> Option<Task> {
        let moved = self
            .service_of
            .get(&*t.id)
            .is_some_and(|s| *s != t.service_id);
        let old = if moved { self.remove(&t.id) } else { None };
        self.service_of.insert(t.id.clone(), t.service_id.clone());
        let list = self.by_service.entry(t.service_id.clone()).or_default();
        match find(list, &t.id) {
            Ok(i) => Some(std::mem::replace(&mut list[i], t)),
            Err(i) => {
                // One more slot, not a doubling: a service's task list is read far more
                // often than it grows, and stays at its size.
                list.reserve_exact(1);
                list.insert(i, t);
                old
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Task> {
        let service = self.service_of.remove(id)?;
        let list = self.by_service.get_mut(&*service)?;
        let i = find(list, id).ok()?;
        let t = list.remove(i);
        if list.is_empty() {
            self.by_service.remove(&*service);
        } else if list.capacity() > list.len() + list.len() / 4 {
            list.shrink_to_fit();
        }
        Some(t)
    }

    /// Every task, by service then id.
    pub fn values(&self) -> impl Iterator<Item = &Task> + '_ {
        self.by_service.values().flatten()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Id> + '_ {
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
        ) {
            let mut tasks = Tasks::default();
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
            for (id, t) in &model {
                prop_assert_eq!(tasks.get(id), Some(t));
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
