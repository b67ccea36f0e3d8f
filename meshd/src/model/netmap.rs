//! `NetMap`: a small sorted map by network id. An object is on one network or a few, and a
//! `BTreeMap` allocates a node for eleven entries even for one: at 100 000 tasks that is
//! tens of megabytes for nothing. Same order, same answers as a `BTreeMap`. One entry (a
//! task's one address, nearly always) is held inline; more are a boxed slice, not a `Vec`:
//! no spare capacity. At 100 000 tasks the inline entry saves 100 000 allocations (2.4 MB).
use std::{fmt, hash::Hash, ops::Index};

use serde::{de::MapAccess, ser::SerializeMap, Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone)]
pub struct NetMap<V>(Repr<V>);

#[derive(Clone)]
enum Repr<V> {
    /// None, or two and more.
    Many(Box<[(Id, V)]>),
    One((Id, V)),
}

use super::objects::Id;

impl<V> Default for Repr<V> {
    fn default() -> Self {
        Repr::Many(Box::default())
    }
}

impl<V> Default for NetMap<V> {
    fn default() -> Self {
        NetMap(Repr::default())
    }
}

impl<V: PartialEq> PartialEq for NetMap<V> {
    fn eq(&self, o: &Self) -> bool {
        self.slice() == o.slice()
    }
}

impl<V: Eq> Eq for NetMap<V> {}

impl<V: Hash> Hash for NetMap<V> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.slice().hash(h)
    }
}

impl<V: PartialOrd> PartialOrd for NetMap<V> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        self.slice().partial_cmp(o.slice())
    }
}

impl<V: Ord> Ord for NetMap<V> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.slice().cmp(o.slice())
    }
}

impl<V: fmt::Debug> fmt::Debug for NetMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.slice().iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<V> NetMap<V> {
    pub fn new() -> Self {
        NetMap::default()
    }

    fn slice(&self) -> &[(Id, V)] {
        match &self.0 {
            Repr::Many(b) => b,
            Repr::One(e) => std::slice::from_ref(e),
        }
    }

    fn slice_mut(&mut self) -> &mut [(Id, V)] {
        match &mut self.0 {
            Repr::Many(b) => b,
            Repr::One(e) => std::slice::from_mut(e),
        }
    }

    /// Changes the entries as a `Vec` (which holds exactly as many as the map did).
    fn edit<R>(&mut self, f: impl FnOnce(&mut Vec<(Id, V)>) -> R) -> R {
        let mut v = match std::mem::take(&mut self.0) {
            Repr::Many(b) => b.into_vec(),
            Repr::One(e) => vec![e],
        };
        let r = f(&mut v);
        self.0 = match v.len() {
            1 => Repr::One(v.pop().expect("one entry")),
            _ => Repr::Many(v.into_boxed_slice()),
        };
        r
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.slice().binary_search_by(|(k, _)| (**k).cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.find(key).ok().map(|i| &self.slice()[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.slice_mut()[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    pub fn insert(&mut self, key: Id, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.slice_mut()[i].1, value)),
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
        self.slice().iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.slice().iter().map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Id, &V)> + '_ {
        self.slice().iter().map(|(k, v)| (k, v))
    }

    pub fn clear(&mut self) {
        self.0 = Repr::default();
    }

    pub fn len(&self) -> usize {
        self.slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice().is_empty()
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
        for (k, _) in self.slice_mut().iter_mut() {
            *k = intern(k);
        }
    }
}

impl<'a, V> IntoIterator for &'a NetMap<V> {
    type Item = (&'a Id, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Id, V)>, fn(&'a (Id, V)) -> (&'a Id, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.slice().iter().map(|(k, v)| (k, v))
    }
}

impl<V: Serialize> Serialize for NetMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.slice() {
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
