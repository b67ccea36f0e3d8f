//! `TaskId`: a task's id, held inline. Swarm's task ids are 25 characters and nothing else
//! shares them, so an `Arc<str>` each was 100 000 allocations of 48 bytes at 10k services
//! (4.8 MB, `bench control`); inline, a task's id is 32 bytes in the task itself. An id
//! longer than fits (not swarm's shape) is kept shared, as before.
use std::{borrow::Borrow, cmp::Ordering, fmt, hash::Hash, ops::Deref, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest id held inline: what fits beside the length and the variant in 32 bytes.
const INLINE: usize = 30;

#[derive(Clone)]
pub struct TaskId(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl TaskId {
    pub fn new(id: &str) -> TaskId {
        if id.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            TaskId(Repr::Inline {
                len: id.len() as u8,
                bytes,
            })
        } else {
            TaskId(Repr::Shared(id.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                // Only ever built from a whole `str` (`new`).
                std::str::from_utf8(&bytes[..*len as usize]).expect("built from a str")
            }
            Repr::Shared(s) => s,
        }
    }
}

impl Deref for TaskId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for TaskId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for TaskId {
    fn from(s: &str) -> TaskId {
        TaskId::new(s)
    }
}

// Equality, order and hash are the text's, as for `str` (lookups by `&str` rely on it).
impl PartialEq for TaskId {
    fn eq(&self, o: &TaskId) -> bool {
        self.as_str() == o.as_str()
    }
}

impl Eq for TaskId {}

impl PartialOrd for TaskId {
    fn partial_cmp(&self, o: &TaskId) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for TaskId {
    fn cmp(&self, o: &TaskId) -> Ordering {
        self.as_str().cmp(o.as_str())
    }
}

impl Hash for TaskId {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(TaskId::new(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_swarm_id_is_held_inline_in_32_bytes() {
        assert_eq!(std::mem::size_of::<TaskId>(), 32);
        let id = TaskId::new("x7k2m9q4w1e8r5t3y6u0i2o4p");
        assert!(matches!(id.0, Repr::Inline { .. }));
        assert_eq!(&*id, "x7k2m9q4w1e8r5t3y6u0i2o4p");
    }

    proptest! {
        /// Inline or shared, an id answers as its text does: same text back, same order,
        /// same equality, same JSON.
        #[test]
        fn an_id_answers_as_its_text(a in "[a-z0-9é]{0,40}", b in "[a-z0-9é]{0,40}") {
            let (ia, ib) = (TaskId::new(&a), TaskId::new(&b));
            prop_assert_eq!(ia.as_str(), a.as_str());
            prop_assert_eq!(ia.cmp(&ib), a.cmp(&b));
            prop_assert_eq!(ia == ib, a == b);
            let json = serde_json::to_string(&ia).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&a).unwrap());
            prop_assert_eq!(serde_json::from_str::<TaskId>(&json).unwrap(), ia);
        }
    }
}
