//! `NetMap`: a small sorted map by network id. An object is on one network or a few, and a
//! `BTreeMap` allocates a node for eleven entries even for one: at 100 000 tasks that is
//! tens of megabytes for nothing. Same order, same answers as a `BTreeMap`. A boxed slice,
//! not a `Vec`: no spare capacity, and one word less in every task.
use std::{fmt, ops::Index};

use serde::{de::MapAccess, ser::SerializeMap, Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetMap<V>(Box<[(Id, V)]>);

use super::objects::Id;

impl<V> Default for NetMap<V> {
    fn default() -> Self {
        NetMap(Box::default())
    }
}

impl<V: fmt::Debug> fmt::Debug for NetMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<V> NetMap<V> {
    pub fn new() -> Self {
        NetMap::default()
    }

    /// Changes the entries as a `Vec` (which holds exactly as many as the slice did).
    fn edit<R>(&mut self, f: impl FnOnce(&mut Vec<(Id, V)>) -> R) -> R {
        let mut v = std::mem::take(&mut self.0).into_vec();
        let r = f(&mut v);
        self.0 = v.into_boxed_slice();
        r
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    pub fn insert(&mut self, key: Id, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                // One more slot, not the doubling a Vec does (its first push reserves four):
                // most maps here stay at one or two entries for their whole life.
                self.edit(|v| {
                    v.reserve_exact(1);
                    v.insert(i, (key, value))
                });
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let i = self.find(key).ok()?;
        Some(self.edit(|v| v.remove(i).1))
    }

    pub fn keys(&self) -> impl Iterator<Item = &Id> + '_ {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Id, &V)> + '_ {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn clear(&mut self) {
        self.0 = Box::default();
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> Index<&str> for NetMap<V> {
    type Output = V;
    fn index(&self, key: &str) -> &V {
        self.get(key).expect("key in NetMap")
    }
}

impl<V> FromIterator<(Id, V)> for NetMap<V> {
    fn from_iter<I: IntoIterator<Item = (Id, V)>>(iter: I) -> Self {
        let mut m = NetMap::new();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

impl<V, const N: usize> From<[(Id, V); N]> for NetMap<V> {
    fn from(a: [(Id, V); N]) -> Self {
        a.into_iter().collect()
    }
}

impl<V, const N: usize> From<[(String, V); N]> for NetMap<V> {
    fn from(a: [(String, V); N]) -> Self {
        a.into_iter().map(|(k, v)| (Id::from(k), v)).collect()
    }
}

impl<V> NetMap<V> {
    /// Replaces each key by the equal one `intern` gives (a shared allocation).
    pub fn intern_keys(&mut self, mut intern: impl FnMut(&Id) -> Id) {
        for (k, _) in self.0.iter_mut() {
            *k = intern(k);
        }
    }
}

impl<'a, V> IntoIterator for &'a NetMap<V> {
    type Item = (&'a Id, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Id, V)>, fn(&'a (Id, V)) -> (&'a Id, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<V: Serialize> Serialize for NetMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NetMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = NetMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map by network id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<NetMap<V>, A::Error> {
                let mut m = NetMap::new();
                while let Some((k, v)) = a.next_entry::<Id, V>()? {
                    m.insert(k, v);
                }
                Ok(m)
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn it_answers_as_a_btreemap_does(ops in proptest::collection::vec((0..6u8, any::<bool>(), 0..100u32), 0..40)) {
            let mut a: NetMap<u32> = NetMap::new();
            let mut b: BTreeMap<Id, u32> = BTreeMap::new();
            for (k, put, v) in ops {
                let k: Id = format!("n{k}").into();
                if put {
                    prop_assert_eq!(a.insert(k.clone(), v), b.insert(k, v));
                } else {
                    prop_assert_eq!(a.remove(&k), b.remove(&k));
                }
            }
            prop_assert!(a.iter().eq(b.iter()));
            let json = serde_json::to_string(&a).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&b).unwrap());
            prop_assert_eq!(serde_json::from_str::<NetMap<u32>>(&json).unwrap(), a);
        }
    }
}
