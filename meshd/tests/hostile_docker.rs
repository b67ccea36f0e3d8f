//! Hostile Docker answers: the decoders fed with mutations of answers recorded from a real
//! dockerd (`tests/fixtures/docker`): values of the wrong type, missing fields, huge arrays,
//! bad addresses, unknown enum values, duplicated elements. No decoder panics, and in a list
//! a bad object is rejected alone, with a reason, while the good ones around it decode.
use meshd::{model::Kind, source::decode};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};

const SERVICE: &str = include_str!("../../tests/fixtures/docker/service.json");
const TASK: &str = include_str!("../../tests/fixtures/docker/task.json");
const NETWORK: &str = include_str!("../../tests/fixtures/docker/network.json");
const NODE: &str = include_str!("../../tests/fixtures/docker/node.json");
const CONTAINER: &str = include_str!("../../tests/fixtures/docker/container.json");

type Decoder = fn(&RawValue) -> Result<(), String>;

/// Each recorded answer, its kind, and its decoder (the result dropped).
fn fixtures() -> Vec<(&'static str, Kind, Decoder)> {
    vec![
        (SERVICE, Kind::Service, |r| decode::service(r).map(drop)),
        (TASK, Kind::Task, |r| decode::task(r).map(drop)),
        (NETWORK, Kind::Network, |r| decode::network(r).map(drop)),
        (NODE, Kind::Node, |r| decode::node(r).map(drop)),
        (CONTAINER, Kind::Container, |r| decode::inspect(r).map(drop)),
    ]
}

/// Every place in a JSON value, as a path of keys and indices.
fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(Step::Key(k.clone()));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(Step::Index(i));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match s {
            Step::Key(k) => cur.get_mut(k.as_str())?,
            Step::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// What a hostile (or merely newer, or buggy) engine might put somewhere.
#[derive(Clone, Debug)]
enum Mutation {
    Delete,
    Replace(Value),
    HugeArray,
    Duplicate,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::Delete),
        Just(Mutation::HugeArray),
        Just(Mutation::Duplicate),
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN", |f| f.is_finite())
                .prop_map(Value::from),
            Just(json!("")),
            Just(json!("999.1.2.3/24")),
            Just(json!("10.0.0.5/99")),
            Just(json!("not-a-state")),
            Just(json!("::1")),
            "[a-z0-9./:-]{0,40}".prop_map(Value::from),
            Just(json!([])),
            Just(json!({})),
            Just(json!([null, 1, "x", {}])),
        ]
        .prop_map(Mutation::Replace),
    ]
}

fn mutate(v: &mut Value, picks: &[(usize, Mutation)]) {
    for (pick, m) in picks {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let path = all[pick % all.len()].clone();
        match m {
            Mutation::Replace(x) => {
                if let Some(slot) = at(v, &path) {
                    *slot = x.clone();
                }
            }
            Mutation::HugeArray => {
                if let Some(slot) = at(v, &path) {
                    // Many small elements, or fewer copies of a big one (the test's own
                    // time stays small; the decoder sees an array far past any real one).
                    let one = slot.clone();
                    let n = if one.to_string().len() < 64 {
                        20_000
                    } else {
                        200
                    };
                    *slot = Value::Array(vec![one; n]);
                }
            }
            Mutation::Delete | Mutation::Duplicate => {
                let Some((last, parent)) = path.split_last() else {
                    continue;
                };
                let Some(p) = at(v, parent) else { continue };
                match (last, p, m) {
                    (Step::Key(k), Value::Object(o), Mutation::Delete) => {
                        o.remove(k);
                    }
                    (Step::Index(i), Value::Array(a), Mutation::Delete) if *i < a.len() => {
                        a.remove(*i);
                    }
                    (Step::Index(i), Value::Array(a), Mutation::Duplicate) if *i < a.len() => {
                        let c = a[*i].clone();
                        a.push(c);
                    }
                    _ => {}
                }
            }
        }
    }
}

fn raw(v: &Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).unwrap()
}

/// A copy of a recorded object under another id, so that a list holds distinct objects.
fn renamed(text: &str, id: &str) -> Value {
    let mut v: Value = serde_json::from_str(text).unwrap();
    v["ID"] = json!(id);
    if v.get("Id").is_some() {
        v["Id"] = json!(id);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any mutation of any recorded answer: the decoder answers (an object or a reason), it
    /// does not panic; a rejection says why.
    #[test]
    fn no_mutation_makes_a_decoder_panic(
        which in 0usize..5,
        picks in proptest::collection::vec((any::<usize>(), mutation()), 1..5),
    ) {
        let (text, _, decoder) = fixtures()[which];
        let mut v: Value = serde_json::from_str(text).unwrap();
        mutate(&mut v, &picks);
        if let Err(reason) = decoder(&raw(&v)) {
            prop_assert!(!reason.is_empty());
        }
    }

    /// In a list answer, a mutated object is rejected alone: the good ones on either side
    /// decode, and a rejection names its kind and says why.
    #[test]
    fn a_bad_object_in_a_list_is_rejected_alone(
        which in 0usize..4,
        picks in proptest::collection::vec((any::<usize>(), mutation()), 1..4),
    ) {
        let (text, kind, _) = fixtures()[which];
        let mut bad = renamed(text, "bad0000000000000000000000");
        mutate(&mut bad, &picks);
        let body = Value::Array(vec![
            renamed(text, "good000000000000000000001"),
            bad,
            renamed(text, "good000000000000000000002"),
        ])
        .to_string();
        let (ok, rejected) = match kind {
            Kind::Service => decode::list(body.as_bytes(), kind, decode::service)
                .map(|(o, r)| (o.into_iter().map(|s| s.id.to_string()).collect::<Vec<_>>(), r)),
            Kind::Task => decode::tasks(body.as_bytes())
                .map(|(o, r)| (o.into_iter().map(|t| t.id.to_string()).collect(), r)),
            Kind::Network => decode::list(body.as_bytes(), kind, decode::network)
                .map(|(o, r)| (o.into_iter().map(|n| n.id.to_string()).collect(), r)),
            _ => decode::list(body.as_bytes(), kind, decode::node)
                .map(|(o, r)| (o.into_iter().map(|n| n.id.to_string()).collect(), r)),
        }
        .expect("the list itself is well formed");
        for good in ["good000000000000000000001", "good000000000000000000002"] {
            prop_assert!(ok.iter().any(|id| id == good), "{good} lost: ok {ok:?}, rejected {rejected:?}");
        }
        prop_assert_eq!(ok.len() + rejected.len(), 3);
        for r in &rejected {
            prop_assert_eq!(r.kind, kind);
            prop_assert!(!r.reason.is_empty());
        }
    }

    /// Event lines: any mutation of a real event, or bytes that are not JSON at all.
    #[test]
    fn events_never_panic(
        picks in proptest::collection::vec((any::<usize>(), mutation()), 1..4),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut v = json!({
            "Type": "container", "Action": "connect", "time": 1764580260u64,
            "timeNano": 1764580260123456789u64,
            "Actor": {"ID": "iaiw7602kle16vf6l1szrh1vv",
                      "Attributes": {"container": "745177de2115", "name": "demo_front", "type": "overlay"}}
        });
        mutate(&mut v, &picks);
        let _ = decode::event(v.to_string().as_bytes());
        let _ = decode::event(&junk);
    }
}

/// The unmutated recordings decode: the tests above start from good objects.
#[test]
fn the_recordings_decode() {
    for (text, kind, decoder) in fixtures() {
        let v: Value = serde_json::from_str(text).unwrap();
        assert!(decoder(&raw(&v)).is_ok(), "{kind:?}");
    }
}
