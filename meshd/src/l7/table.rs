//! The table requests are matched against: built whole from `Desired` on every change and
//! swapped in (`ArcSwap`); a request in flight keeps the table it started with.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

use crate::{
    compile::l7::{L7Route, Via, DEFAULT_HOST},
    model::Id,
};

/// One route as the proxy serves it (in one worker's table; aligned to its own cache
/// lines, as its reference count is written per request).
#[derive(Debug)]
#[repr(align(64))]
pub struct Served {
    pub route: Arc<L7Route>,
    /// The namespace upstream connections are opened from (None: from the node itself, or
    /// no local container on the network yet).
    pub netns: Option<Arc<str>>,
    /// Each upstream's address as its `x-upstream-addr` header, made once per table.
    pub upstream_addr: Vec<hyper::header::HeaderValue>,
    /// Kept across table swaps while the service keeps its route.
    pub stats: Arc<RouteStats>,
}

/// A route's counters in one worker (and its round-robin position there), on cache lines
/// of their own.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct RouteStats {
    pub next: AtomicUsize,
    /// Answers of 500 and above (meshd's own 502/503 included).
    pub errors: AtomicU64,
    /// Time to the response head; its count is the route's requests.
    pub latency: meshd_dns::latency::Latency,
}

impl RouteStats {
    pub fn record(&self, status: u16, took: std::time::Duration) {
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.observe(took);
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Host → its routes, longest path prefix first.
    hosts: HashMap<String, Vec<(String, Arc<Served>)>>,
    default: Option<Arc<Served>>,
    by_service: HashMap<Id, Arc<Served>>,
}

impl RouteTable {
    /// The table for these routes; `cluster`: serve only routes of that service cluster
    /// (`--service-cluster`), else only routes of none. `old` lends its round-robin
    /// positions to routes that are still there.
    pub fn build(
        routes: &std::collections::BTreeMap<Id, Arc<L7Route>>,
        netns: &std::collections::BTreeMap<Id, String>,
        cluster: Option<&str>,
        old: &RouteTable,
    ) -> RouteTable {
        let mut t = RouteTable::default();
        for (sid, r) in routes {
            if r.spec.service_cluster.as_deref() != cluster {
                continue;
            }
            let served = Arc::new(Served {
                route: r.clone(),
                netns: match &r.via {
                    Via::Network(n) => netns.get(n).map(|p| Arc::from(p.as_str())),
                    Via::Host => None,
                },
                upstream_addr: r
                    .upstreams
                    .iter()
                    .map(|u| {
                        hyper::header::HeaderValue::from_str(&u.addr.to_string())
                            .unwrap_or(hyper::header::HeaderValue::from_static("-"))
                    })
                    .collect(),
                stats: old
                    .by_service
                    .get(sid)
                    .map(|o| o.stats.clone())
                    .unwrap_or_default(),
            });
            for k in r.keys() {
                if k.host == DEFAULT_HOST {
                    t.default = Some(served.clone());
                } else {
                    t.hosts
                        .entry(k.host)
                        .or_default()
                        .push((k.path, served.clone()));
                }
            }
            t.by_service.insert(sid.clone(), served);
        }
        for list in t.hosts.values_mut() {
            list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        }
        t
    }

    /// The route for a request: its host (any case, a port or trailing dot ignored) and
    /// the longest path prefix that ends at a segment boundary; else the default backend.
    pub fn lookup(&self, host: &str, path: &str) -> Option<(&Arc<Served>, &str)> {
        let host = normalize_host(host);
        if let Some(list) = self.hosts.get(host.as_str()) {
            for (prefix, s) in list {
                if under(path, prefix) {
                    return Some((s, prefix));
                }
            }
        }
        self.default.as_ref().map(|s| (s, "/"))
    }

    /// Every route served, by service id.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Served>> {
        self.by_service.values()
    }

    pub fn len(&self) -> usize {
        self.by_service.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

/// `Host` as routes name it: lower case, without port or trailing dot.
pub fn normalize_host(host: &str) -> String {
    let h = match host.rsplit_once(':') {
        // Not an IPv6 literal's colon.
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `path` is `prefix` or below it (`/app` covers `/app`, `/app/x`, not `/apple`).
pub fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::labels::RouteSpec;
    use std::collections::BTreeMap;

    fn route(sid: &str, hosts: &[&str], root: Option<&str>, cluster: Option<&str>) -> Arc<L7Route> {
        Arc::new(L7Route {
            service_id: sid.into(),
            service_name: sid.into(),
            spec: RouteSpec {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                port: 80,
                context_root: root.map(str::to_string),
                service_cluster: cluster.map(str::to_string),
                default_backend: hosts.is_empty(),
                ..RouteSpec::default()
            },
            via: Via::Network("n1".into()),
            upstreams: vec![],
            relays: vec![],
            created: String::new(),
        })
    }

    #[test]
    fn hosts_and_the_longest_path_prefix_pick_the_route() {
        let routes: BTreeMap<Id, Arc<L7Route>> = [
            ("shop", route("shop", &["shop.example.com"], None, None)),
            (
                "api",
                route("api", &["shop.example.com"], Some("/api"), None),
            ),
            (
                "east",
                route("east", &["east.example.com"], None, Some("us-east")),
            ),
            ("fallback", route("fallback", &[], None, None)),
        ]
        .into_iter()
        .map(|(k, v)| (Id::from(k), v))
        .collect();
        let netns = [(Id::from("n1"), "/run/docker/netns/abc".to_string())].into();
        let t = RouteTable::build(&routes, &netns, None, &RouteTable::default());
        let pick = |h: &str, p: &str| t.lookup(h, p).map(|(s, _)| s.route.service_name.clone());
        assert_eq!(pick("shop.example.com", "/"), Some("shop".into()));
        assert_eq!(pick("SHOP.example.com:8080", "/api/x"), Some("api".into()));
        assert_eq!(pick("shop.example.com.", "/api"), Some("api".into()));
        assert_eq!(pick("shop.example.com", "/apis"), Some("shop".into()));
        assert_eq!(
            pick("nobody.example.com", "/"),
            Some("fallback".into()),
            "default backend"
        );
        assert_eq!(
            pick("east.example.com", "/"),
            Some("fallback".into()),
            "another cluster's"
        );
        assert_eq!(
            t.lookup("shop.example.com", "/")
                .unwrap()
                .0
                .netns
                .as_deref(),
            Some("/run/docker/netns/abc")
        );
        let east = RouteTable::build(&routes, &netns, Some("us-east"), &t);
        assert_eq!(east.len(), 1);
        assert!(east.lookup("shop.example.com", "/").is_none());
        // A rebuilt table keeps a route's round-robin position.
        t.by_service["shop"].stats.next.store(7, Ordering::Relaxed);
        let again = RouteTable::build(&routes, &netns, None, &t);
        assert_eq!(
            again.by_service["shop"].stats.next.load(Ordering::Relaxed),
            7
        );
    }

    #[test]
    fn hosts_are_normalized_and_prefixes_end_at_segments() {
        assert_eq!(normalize_host("A.B:80"), "a.b");
        assert_eq!(normalize_host("[::1]:80"), "[::1]:80".to_ascii_lowercase());
        assert!(under("/app/x", "/app") && under("/app", "/app") && !under("/apple", "/app"));
        assert!(under("/anything", "/"));
    }
}
