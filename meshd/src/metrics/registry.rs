//! The metrics. Most are read at scrape time from what meshd keeps anyway (the sources'
//! and appliers' records, `Desired`, the DNS counters, the kernel's connection counters):
//! a fresh registry per scrape, so nothing on the data path pays for them. Latencies are
//! histograms observed where they happen (`Histograms`).
use std::collections::BTreeMap;

use anyhow::Result;
use prometheus_client::{
    encoding::{text::encode, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        MetricType, TypedMetric,
    },
    registry::{Registry, Unit},
};

use crate::status::{Shared, VipDatapath};

type Labels = Vec<(String, String)>;

/// Latency histograms, observed by the reconcile loop; cloned into each scrape's registry
/// (a clone shares its buckets).
#[derive(Clone, Debug)]
pub struct Histograms {
    /// Docker event (or feed change) received → datapath written.
    pub event_to_datapath: Histogram,
    /// One reconcile step that wrote something: apply the changes, compile, write.
    pub sync: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        // 50 µs to about 13 s.
        let buckets = || exponential_buckets(0.000_05, 2.0, 19);
        Histograms {
            event_to_datapath: Histogram::new(buckets()),
            sync: Histogram::new(buckets()),
        }
    }
}

/// A histogram kept in atomics where it is observed (the DNS server per receive batch, the
/// L7 workers per request), in the text format: one snapshot per scrape.
#[derive(Debug, Default)]
struct Snapshot(std::sync::Mutex<meshd_dns::latency::LatencyView>);

impl TypedMetric for Snapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Snapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let v = self.0.lock().unwrap();
        encoder.encode_histogram::<NoLabelSet>(v.sum_seconds, v.count, &v.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Counters read from a total kept elsewhere.
fn counter(total: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(total);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// A family of counters, one per label set.
fn counters(values: impl IntoIterator<Item = (Labels, u64)>) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in values {
        f.get_or_create(&l).inc_by(v);
    }
    f
}

fn gauges(values: impl IntoIterator<Item = (Labels, i64)>) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        f.get_or_create(&l).set(v);
    }
    f
}

/// Everything, in the text format.
pub fn scrape(shared: &Shared) -> Result<String> {
    let mut r = Registry::with_prefix("meshd");
    let choice = &shared.choice;
    r.register(
        "info",
        "meshd's version and the VIP datapath it runs (value 1)",
        gauges([(
            labels(&[
                ("version", crate::VERSION),
                ("datapath", &choice.kind.to_string()),
            ]),
            1,
        )]),
    );

    // Docker reads, by source.
    let local = shared.local.lock().unwrap().clone();
    let swarm = shared.swarm.lock().unwrap().clone();
    let by_source = |f: &dyn Fn(&crate::source::local::SourceStatus) -> u64| {
        [
            (labels(&[("source", "local")]), f(&local)),
            (labels(&[("source", "swarm")]), f(&swarm)),
        ]
    };
    type Field = fn(&crate::source::local::SourceStatus) -> u64;
    let per_source: [(&str, &str, Field); 4] = [
        (
            "docker_reads",
            "Docker Engine API reads (one request answered)",
            |s| s.reads,
        ),
        (
            "docker_read_failures",
            "Docker Engine API reads and event streams that failed",
            |s| s.failures,
        ),
        ("docker_events", "Docker events received", |s| s.events),
        (
            "docker_resyncs",
            "Full reads of what a source follows",
            |s| s.resyncs,
        ),
    ];
    for (name, help, field) in per_source {
        r.register(name, help, counters(by_source(&field)));
    }
    r.register(
        "docker_connected",
        "Whether the source's Docker API answers now (1) or not (0)",
        gauges(
            [("local", &local), ("swarm", &swarm)]
                .into_iter()
                .map(|(n, s)| (labels(&[("source", n)]), i64::from(s.connected))),
        ),
    );

    // The reconcile loop and its appliers.
    let rec = shared.reconcile.lock().unwrap().clone();
    r.register(
        "reconcile_batches",
        "Batches of changes the reconcile loop took",
        counter(rec.batches),
    );
    r.register(
        "reconcile_changes",
        "Changes the reconcile loop applied",
        counter(rec.changes),
    );
    r.register(
        "reconcile_sweeps",
        "Full passes of every applier over everything (the drift safety net)",
        counter(rec.sweeps),
    );
    let per_applier = |f: &dyn Fn(&crate::status::ApplierStatus) -> u64| {
        rec.appliers
            .iter()
            .map(|a| (labels(&[("applier", &a.name)]), f(a)))
            .collect::<Vec<_>>()
    };
    r.register(
        "applier_applies",
        "Applies per applier (ebpf or ipvs, dns, l7)",
        counters(per_applier(&|a| a.applies)),
    );
    r.register(
        "applier_writes",
        "Entries an applier wrote (map entries, IPVS commands, DNS redirects, routes)",
        counters(per_applier(&|a| a.totals.writes as u64)),
    );
    r.register(
        "applier_deletes",
        "Entries an applier deleted",
        counters(per_applier(&|a| a.totals.deletes as u64)),
    );
    r.register(
        "applier_failures",
        "Applies that failed (retried; the reason is in meshctl status)",
        counters(per_applier(&|a| a.failures)),
    );
    r.register_with_unit(
        "event_to_datapath",
        "Docker event received to datapath written",
        Unit::Seconds,
        rec.histograms.event_to_datapath.clone(),
    );
    r.register_with_unit(
        "sync_duration",
        "One reconcile step that wrote something: apply, compile, write",
        Unit::Seconds,
        rec.histograms.sync.clone(),
    );

    // What compile made of the swarm.
    {
        let core = shared.core.read().unwrap();
        let (state, desired) = (&core.state, core.compiler.desired());
        let mut rejected: BTreeMap<String, i64> = BTreeMap::new();
        for x in &desired.rejected {
            *rejected
                .entry(format!("{:?}", x.kind).to_lowercase())
                .or_default() += 1;
        }
        r.register(
            "rejected_objects",
            "Objects rejected alone (unreadable or unusable), by kind; meshctl status says why",
            gauges(
                rejected
                    .into_iter()
                    .map(|(k, n)| (labels(&[("kind", &k)]), n)),
            ),
        );
        r.register(
            "services",
            "Services known",
            gauge(state.services.len() as i64),
        );
        r.register("tasks", "Tasks known", gauge(state.tasks.len() as i64));
        r.register(
            "load_balancers",
            "VIP load balancers programmed on this node",
            gauge(desired.lbs.len() as i64),
        );
        r.register(
            "backends",
            "Backends of those load balancers",
            gauge(
                desired
                    .lbs
                    .values()
                    .map(|l| l.backends.len())
                    .sum::<usize>() as i64,
            ),
        );
        r.register(
            "sandboxes",
            "Local containers whose namespace meshd programs",
            gauge(desired.sandboxes.len() as i64),
        );
    }

    // The datapath.
    match &shared.datapath {
        VipDatapath::Ebpf(e) => {
            let e = e.lock().unwrap();
            let fill = e.map_fill();
            r.register(
                "ebpf_map_entries",
                "Entries meshd wrote in each of its VIP maps",
                gauges(
                    fill.iter()
                        .map(|(m, n, _)| (labels(&[("map", m)]), *n as i64)),
                ),
            );
            r.register(
                "ebpf_map_capacity",
                "Entries each VIP map can hold",
                gauges(
                    fill.iter()
                        .map(|(m, _, c)| (labels(&[("map", m)]), i64::from(*c))),
                ),
            );
            if let Some(ig) = e.ingress_status() {
                r.register(
                    "ingress_published_ports",
                    "Published ports the ingress mesh answers on this node",
                    gauge(ig.ports as i64),
                );
                r.register(
                    "ingress_events",
                    "The ingress mesh's packet counters, by event (packets_in, new_flows, \
                     tunnelled, dropped_*, icmp_errors, ...)",
                    counters(
                        ig.counters
                            .iter()
                            .map(|(k, v)| (labels(&[("event", k)]), *v)),
                    ),
                );
            }
            if let Ok(c) = e.counters() {
                drop(e);
                service_connections(&mut r, shared, &c);
            }
        }
        VipDatapath::Ipvs(i) => {
            let s = i.lock().unwrap().summary();
            r.register(
                "ipvs_services",
                "IPVS services meshd holds, over all sandboxes",
                gauge(s.services as i64),
            );
            r.register(
                "ipvs_real_servers",
                "IPVS real servers meshd holds, over all sandboxes",
                gauge(s.real_servers as i64),
            );
        }
    }

    // The embedded DNS.
    if let Some(res) = &shared.resolver {
        let s = res.stats.view();
        r.register(
            "dns_queries",
            "DNS queries received, by transport",
            counters([
                (labels(&[("transport", "udp")]), s.udp),
                (labels(&[("transport", "tcp")]), s.tcp),
            ]),
        );
        r.register(
            "dns_replies",
            "DNS replies, by outcome",
            counters(
                [
                    ("answered", s.answered),
                    ("forwarded", s.forwarded),
                    ("truncated", s.truncated),
                    ("refused", s.refused),
                    ("formerr", s.formerr),
                    ("notimp", s.notimp),
                    ("servfail", s.servfail),
                    ("dropped", s.dropped),
                ]
                .into_iter()
                .map(|(o, n)| (labels(&[("outcome", o)]), n)),
            ),
        );
        r.register(
            "dns_forward_failures",
            "Queries no upstream resolver answered",
            counter(s.forward_failed),
        );
        r.register(
            "dns_upstream_up",
            "Whether an upstream resolver answered its last forwarded query (1) or not (0)",
            gauges(
                res.upstream_reachable()
                    .into_iter()
                    .map(|(u, up)| (labels(&[("upstream", &u.to_string())]), i64::from(up))),
            ),
        );
        let latency = Family::<Labels, Snapshot>::default();
        for (path, l) in [
            ("local", &res.stats.local_latency),
            ("forwarded", &res.stats.forward_latency),
        ] {
            *latency
                .get_or_create(&labels(&[("path", path)]))
                .0
                .lock()
                .unwrap() = l.view();
        }
        r.register_with_unit(
            "dns_reply_duration",
            "Query received to reply sent: answered from the zones (local) or forwarded",
            Unit::Seconds,
            latency,
        );
    }

    if shared.l7.is_some() {
        l7_routes(&mut r, shared);
    }

    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

/// New connections per service: the eBPF datapath's counters, summed over the service's
/// load balancers.
fn service_connections(r: &mut Registry, shared: &Shared, c: &crate::datapath::ebpf::Counters) {
    let core = shared.core.read().unwrap();
    let mut per: BTreeMap<String, u64> = BTreeMap::new();
    for (lb, n) in &c.per_lb {
        let name = core
            .state
            .services
            .get(&lb.service_id)
            .map_or_else(|| lb.service_id.to_string(), |s| s.name.to_string());
        *per.entry(name).or_default() += n;
    }
    r.register(
        "service_connections",
        "Connections made to a service's VIPs from this node's containers",
        counters(
            per.into_iter()
                .map(|(s, n)| (labels(&[("service", &s)]), n)),
        ),
    );
}

/// The L7 front end, per route (host and path).
fn l7_routes(r: &mut Registry, shared: &Shared) {
    let view = crate::l7::RoutesView::of(shared);
    let route = |v: &crate::l7::RouteView| {
        labels(&[
            ("host", &v.host),
            ("path", &v.path),
            ("service", &v.service),
        ])
    };
    let served: Vec<&crate::l7::RouteView> = view.routes.iter().filter(|v| v.served_here).collect();
    r.register(
        "l7_requests",
        "Requests the L7 front end answered, per route",
        counters(served.iter().map(|v| (route(v), v.requests))),
    );
    r.register(
        "l7_errors",
        "Answers of status 500 and above, per route (meshd's own 502 and 503 included)",
        counters(served.iter().map(|v| (route(v), v.errors))),
    );
    let time = Family::<Labels, Snapshot>::default();
    for v in &served {
        *time.get_or_create(&route(v)).0.lock().unwrap() = v.latency.clone();
    }
    r.register_with_unit(
        "l7_response_duration",
        "Request received to the response head sent, per route",
        Unit::Seconds,
        time,
    );
    r.register(
        "l7_in_flight",
        "Requests being answered now",
        gauge(view.in_flight as i64),
    );
    r.register(
        "l7_routes_rejected",
        "Services whose com.docker.lb.* labels give them no route (meshctl routes says why)",
        gauge(view.rejected.len() as i64),
    );
}
