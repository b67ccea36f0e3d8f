//! One log line per decision about a rejected object: when it is rejected (or its reason
//! changes), and when it is used again. `meshctl status` lists what is rejected now; the
//! log says when each began and ended.
use std::collections::HashMap;

use tracing::{info, warn};

use crate::model::{Kind, Rejected};

/// Beyond this many in one step (a cold start into a swarm full of bad labels), one line
/// says how many more there are instead of a line each.
const MAX_LINES: usize = 20;

/// What changed between two lists of rejected objects: the newly rejected (or rejected for
/// a new reason), and those no longer rejected.
pub fn diff<'a>(
    before: &'a [Rejected],
    after: &'a [Rejected],
) -> (Vec<&'a Rejected>, Vec<&'a Rejected>) {
    let key = |r: &'a Rejected| (r.kind, r.id.as_str());
    let old: HashMap<(Kind, &str), &str> =
        before.iter().map(|r| (key(r), r.reason.as_str())).collect();
    let new: HashMap<(Kind, &str), &str> =
        after.iter().map(|r| (key(r), r.reason.as_str())).collect();
    let rejected = after
        .iter()
        .filter(|r| old.get(&key(r)) != Some(&r.reason.as_str()))
        .collect();
    let cleared = before
        .iter()
        .filter(|r| !new.contains_key(&key(r)))
        .collect();
    (rejected, cleared)
}

/// Logs what `diff` finds.
pub fn log(before: &[Rejected], after: &[Rejected]) {
    let (rejected, cleared) = diff(before, after);
    for r in rejected.iter().take(MAX_LINES) {
        warn!(kind = %r.kind, id = %r.id, reason = %r.reason, "object rejected; the rest is used");
    }
    if rejected.len() > MAX_LINES {
        warn!(
            more = rejected.len() - MAX_LINES,
            "more objects rejected; meshctl status lists them all"
        );
    }
    for r in cleared.iter().take(MAX_LINES) {
        info!(kind = %r.kind, id = %r.id, "object no longer rejected");
    }
    if cleared.len() > MAX_LINES {
        info!(
            more = cleared.len() - MAX_LINES,
            "more objects no longer rejected"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(kind: Kind, id: &str, reason: &str) -> Rejected {
        Rejected {
            kind,
            id: id.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn new_reasons_and_cleared_objects_are_told_apart_from_standing_ones() {
        let before = [
            r(Kind::Service, "s1", "bad name"),
            r(Kind::Service, "s2", "bad port"),
            r(Kind::Task, "s2", "bad address"),
        ];
        let after = [
            r(Kind::Service, "s1", "bad name"),
            r(Kind::Service, "s2", "bad label"),
            r(Kind::Network, "n1", "bad subnet"),
        ];
        let (rejected, cleared) = diff(&before, &after);
        let ids = |v: Vec<&Rejected>| -> Vec<(Kind, String)> {
            v.into_iter().map(|r| (r.kind, r.id.clone())).collect()
        };
        assert_eq!(
            ids(rejected),
            [(Kind::Service, "s2".into()), (Kind::Network, "n1".into())],
            "a new reason is logged again; a standing one is not"
        );
        assert_eq!(ids(cleared), [(Kind::Task, "s2".into())]);
        let (rejected, cleared) = diff(&after, &after);
        assert!(rejected.is_empty() && cleared.is_empty());
    }
}
