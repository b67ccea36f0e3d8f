//! The reconcile loop: updates from the sources → ClusterState → compile what they touched
//! → each applier writes the difference. A burst of updates is taken as one step. An applier
//! that fails keeps what it was asked to do and gets it again on the next step or tick, so a
//! failure never loses a change; while Docker cannot be read nothing is applied at all, and
//! the kernel keeps forwarding what it has.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::rejections;
use crate::{
    compile::Changed,
    datapath::{Applier, ApplyStats},
    feed::{feeds, report_of},
    model::{Change, Dirty, NodeReport, Rejected},
    source::{Origin, Update},
    status::{unix_ms, ApplierStatus, Core, ReconcileStatus},
};

/// One applier and what it still has to do.
pub struct Slot {
    pub applier: Arc<Mutex<dyn Applier>>,
    pending: Changed,
    /// Sweep on the next apply (start, after a failure, the periodic full pass).
    everything: bool,
}

impl Slot {
    pub fn new(applier: Arc<Mutex<dyn Applier>>) -> Slot {
        Slot {
            applier,
            pending: Changed::default(),
            everything: true,
        }
    }
}

/// What one step did.
#[derive(Debug, Default)]
pub struct Step {
    pub changes: usize,
    pub written: ApplyStats,
    pub failed: usize,
}

pub struct Reconciler {
    pub core: Arc<RwLock<Core>>,
    pub slots: Vec<Slot>,
    /// This node's id: its report goes to the managers (and, on a manager, into the feed).
    pub node_id: String,
    /// Where the node id comes from once the swarm side knows it: asked before every step,
    /// so the first report is part of the first compile, not a late one that redoes every
    /// network the node's containers are on.
    pub whoami: Option<Box<dyn Fn() -> String + Send>>,
    pub report: Option<watch::Sender<Option<NodeReport>>>,
    pub status: Arc<Mutex<ReconcileStatus>>,
    last_report: Option<NodeReport>,
    /// Sources whose first full read has not arrived: nothing is applied before.
    waiting: BTreeSet<Source>,
    /// What changed before every source was read: compiled once, when they all are (a cold
    /// read arrives in slices, and compiling after each would redo the networks each time).
    unread: Dirty,
    /// Time spent compiling load balancers while the first read was still coming in.
    early_compile: Duration,
    /// Time spent writing them, meanwhile.
    early_apply: Duration,
    /// Services whose tasks the cold read has brought so far: only their load balancers
    /// may be written before it is over (one whose tasks are not read yet has none).
    read_whole: BTreeSet<String>,
    /// The rejected objects as last logged.
    rejected_logged: Vec<Rejected>,
}

/// Which full reads must arrive before the first apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// This node's containers.
    Local,
    /// The swarm (from a manager's engine or the feed).
    Swarm,
}

impl Reconciler {
    pub fn new(
        core: Arc<RwLock<Core>>,
        slots: Vec<Slot>,
        status: Arc<Mutex<ReconcileStatus>>,
    ) -> Reconciler {
        {
            let mut st = status.lock().unwrap();
            st.appliers = slots
                .iter()
                .map(|s| ApplierStatus {
                    name: s.applier.lock().unwrap().name().to_string(),
                    ..Default::default()
                })
                .collect();
        }
        Reconciler {
            core,
            slots,
            node_id: String::new(),
            whoami: None,
            report: None,
            status,
            last_report: None,
            waiting: [Source::Local, Source::Swarm].into(),
            unread: Dirty::default(),
            early_compile: Duration::ZERO,
            early_apply: Duration::ZERO,
            read_whole: BTreeSet::new(),
            rejected_logged: Vec::new(),
        }
    }

    /// The swarm side needs no read (this node is not in a swarm).
    pub fn no_swarm(&mut self) {
        self.waiting.remove(&Source::Swarm);
    }

    /// Whether every source has been read whole once.
    pub fn ready(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Takes a batch of updates into the state, compiles what they touched and applies.
    pub fn step(&mut self, updates: Vec<Update>) -> Step {
        let started = Instant::now();
        if let Some(id) = self.whoami.as_ref().map(|f| f()) {
            if id != self.node_id {
                self.node_id = id;
            }
        }
        let origin = updates.iter().filter_map(|u| u.origin).min();
        let read_at = updates.iter().filter_map(|u| u.read_at).min();
        let was_ready = self.ready();
        for u in &updates {
            if u.complete {
                self.waiting.remove(&match u.from {
                    Origin::Local => Source::Local,
                    _ => Source::Swarm,
                });
            }
        }
        let ready = self.ready();
        let mut count = 0;
        let changed = {
            let mut core = self.core.write().unwrap();
            let mut dirty = Dirty::default();
            let mut to_feed = Vec::new();
            // Before the first full read nobody can resume from this log unless they are
            // listening now: the cold read (the whole swarm) is not diffed and encoded for
            // no one. Whoever subscribes later starts from a snapshot.
            let serving = core.feed.is_some();
            let listened = core.feed.as_ref().is_some_and(|f| ready || f.listening());
            let mut unfed = false;
            for u in updates {
                for c in u.changes {
                    count += 1;
                    if !ready {
                        if let Change::ServiceTasks { service_id, .. } = &c {
                            self.read_whole.insert(service_id.clone());
                        }
                    }
                    if serving && matches!(u.from, Origin::Swarm | Origin::Peer) && feeds(&c) {
                        if listened {
                            // Only what differs: a re-read of a service's hundred tasks in
                            // which two moved sends two.
                            to_feed.extend(crate::feed::diff::minimal(&core.state, &c));
                        } else {
                            unfed = true;
                        }
                    }
                    dirty.merge(core.state.apply(c));
                }
            }
            if unfed {
                if let Some(feed) = core.feed.as_mut() {
                    feed.skip();
                }
            }
            // What this node reports follows its containers.
            if !self.node_id.is_empty() {
                let mine = report_of(&core.state, &self.node_id);
                if self.last_report.as_ref() != Some(&mine) {
                    if core.feed.is_some() {
                        // A manager's own report is part of what it serves.
                        dirty.merge(core.state.apply(Change::PutReport(mine.clone())));
                        to_feed.push(Change::PutReport(mine.clone()));
                    }
                    if let Some(tx) = &self.report {
                        let _ = tx.send(Some(mine.clone()));
                    }
                    self.last_report = Some(mine);
                }
            }
            if let Some(feed) = core.feed.as_mut() {
                feed.publish(to_feed);
            }
            if ready {
                dirty.merge(std::mem::take(&mut self.unread));
                let Core {
                    state, compiler, ..
                } = &mut *core;
                let t = Instant::now();
                let changed = compiler.update(state, &dirty);
                // The first apply says what the whole read rejected (slices compiled early
                // may have changed the list before).
                if changed.rejected || !was_ready {
                    let now = &compiler.desired().rejected;
                    rejections::log(&self.rejected_logged, now);
                    self.rejected_logged.clone_from(now);
                }
                if !was_ready {
                    let mut st = self.status.lock().unwrap();
                    st.first_compile_ms = t.elapsed().as_secs_f64() * 1000.0;
                    st.early_compile_ms = self.early_compile.as_secs_f64() * 1000.0;
                }
                changed
            } else {
                // Load balancers are per service and compile in time proportional to the
                // service: done as the slices come in, overlapping the rest of the read.
                // Networks (DNS) and sandboxes wait: each slice would redo them whole.
                let services = Dirty {
                    services: std::mem::take(&mut dirty.services),
                    ..Dirty::default()
                };
                let Core {
                    state, compiler, ..
                } = &mut *core;
                let t = Instant::now();
                let changed = compiler.update(state, &services);
                self.early_compile += t.elapsed();
                self.unread.merge(dirty);
                changed
            }
        };
        let mut step = if !ready {
            // The first apply sweeps everything anyway; until then only appliers that may
            // take services read whole get them.
            self.apply_early(&changed)
        } else if !was_ready {
            let t = Instant::now();
            let step = self.apply(&changed, true);
            let apply_ms = t.elapsed().as_secs_f64() * 1000.0;
            // The first full read and compile leave much freed memory behind in the
            // allocator's arenas: give it back (glibc keeps it otherwise). Done before ready
            // is stamped, so the stamp covers all of getting ready (under 1 ms at 10k).
            let t = Instant::now();
            // SAFETY: malloc_trim only releases free memory.
            unsafe { libc::malloc_trim(0) };
            let trim_ms = t.elapsed().as_secs_f64() * 1000.0;
            let mut st = self.status.lock().unwrap();
            st.ready_unix_ms = unix_ms();
            st.first_apply_ms = apply_ms;
            st.early_apply_ms = self.early_apply.as_secs_f64() * 1000.0;
            self.read_whole = BTreeSet::new();
            st.first_apply_writes = step.written.writes;
            info!(
                writes = step.written.writes,
                apply_ms, trim_ms, "every source read once: applied"
            );
            drop(st);
            step
        } else {
            self.apply(&changed, false)
        };
        step.changes = count;
        let mut st = self.status.lock().unwrap();
        st.batches += 1;
        st.changes += count as u64;
        st.steps += 1;
        st.last_step_unix_ms = unix_ms();
        if !step.written.is_empty() {
            st.step_time.push(started.elapsed());
            st.histograms.sync.observe(started.elapsed().as_secs_f64());
            if let Some(r) = read_at {
                st.read_to_map.push(r.elapsed());
            }
            if let Some(o) = origin {
                let took = o.elapsed();
                st.event_to_map.push(took);
                st.histograms.event_to_datapath.observe(took.as_secs_f64());
                info!(
                    writes = step.written.writes,
                    deletes = step.written.deletes,
                    event_to_map_us = took.as_micros() as u64,
                    "datapath updated"
                );
            }
        }
        step
    }

    /// Gives every applier what is pending (and a full sweep to those marked for one).
    pub fn apply(&mut self, changed: &Changed, sweep: bool) -> Step {
        if !self.ready() {
            return Step::default();
        }
        let core = self.core.read().unwrap();
        let desired = core.compiler.desired();
        let mut step = Step::default();
        let mut st = self.status.lock().unwrap();
        if sweep {
            st.sweeps += 1;
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.pending.merge(changed);
            let everything = slot.everything || sweep;
            let mut applier = slot.applier.lock().unwrap();
            if slot.pending.is_empty() && !everything && !applier.wants_retry() {
                continue;
            }
            let rec = &mut st.appliers[i];
            match applier.apply(desired, &slot.pending, everything) {
                Ok(stats) => {
                    slot.pending = Changed::default();
                    slot.everything = false;
                    rec.applies += 1;
                    rec.last = stats;
                    rec.totals.add(stats);
                    rec.pending = false;
                    rec.last_error = None;
                    step.written.add(stats);
                }
                Err(e) => {
                    // What the failed apply half-did may lie outside `pending`: the retry
                    // sweeps.
                    slot.everything = true;
                    step.failed += 1;
                    rec.failures += 1;
                    rec.pending = true;
                    let msg = format!("{e:#}");
                    if rec.last_error.as_deref() != Some(&msg) {
                        warn!(applier = applier.name(), error = %msg, "apply failed; will retry");
                    }
                    rec.last_error = Some(msg);
                }
            }
        }
        step
    }

    /// Before every source is read: the load balancers `changed` names, to the appliers
    /// that take them early, once this node's containers are read (they hold tasks back).
    /// Nothing is swept and nothing is marked done: the first full apply still sweeps.
    fn apply_early(&mut self, changed: &Changed) -> Step {
        let mut step = Step::default();
        if self.waiting.contains(&Source::Local) || changed.lbs.is_empty() {
            return step;
        }
        let t = Instant::now();
        let core = self.core.read().unwrap();
        let desired = core.compiler.desired();
        let only_lbs = Changed {
            lbs: (changed.lbs.iter())
                .filter(|r| self.read_whole.contains(&*r.service_id))
                .cloned()
                .collect(),
            ..Changed::default()
        };
        if only_lbs.lbs.is_empty() {
            return step;
        }
        for slot in &self.slots {
            let mut applier = slot.applier.lock().unwrap();
            if !applier.applies_early() {
                continue;
            }
            match applier.apply(desired, &only_lbs, false) {
                Ok(stats) => step.written.add(stats),
                // The first full apply sweeps and retries; the read goes on.
                Err(e) => {
                    step.failed += 1;
                    warn!(applier = applier.name(), error = %format!("{e:#}"), "early apply failed; the first full apply redoes it");
                }
            }
        }
        self.early_apply += t.elapsed();
        step
    }

    /// A full pass: every applier re-checks everything it owns against Desired.
    pub fn sweep(&mut self) -> Step {
        self.apply(&Changed::default(), true)
    }

    /// Retries what failed; a no-op when nothing is pending.
    pub fn retry(&mut self) -> Step {
        self.apply(&Changed::default(), false)
    }
}

/// A step is blocking work (map syscalls, sockets opened in other namespaces, a first
/// compile of a large cluster): on a multi-threaded runtime, tell it so, and it moves the
/// other tasks (the API, the sources) off this worker meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs until `updates` closes or `stop` fires: each burst of updates is one step; a tick
/// retries failures; every `sweep_every`, a full pass.
pub async fn run(
    mut r: Reconciler,
    mut updates: mpsc::UnboundedReceiver<Update>,
    mut tick: impl FnMut(&mut Reconciler) + Send,
    sweep_every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Reconciler {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sweep = Instant::now() + sweep_every;
    loop {
        tokio::select! {
            u = updates.recv() => {
                let Some(u) = u else { break };
                let mut batch = vec![u];
                while let Ok(more) = updates.try_recv() {
                    batch.push(more);
                }
                blocking(|| r.step(batch));
            }
            _ = ticker.tick() => {
                blocking(|| {
                    tick(&mut r);
                    if Instant::now() >= next_sweep {
                        r.sweep();
                        next_sweep = Instant::now() + sweep_every;
                    } else {
                        r.retry();
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        compile::Desired,
        model::{state_tests::*, Change},
    };

    /// Records what it was asked; fails while `fail` is set.
    #[derive(Default)]
    struct Fake {
        calls: Vec<(Changed, bool)>,
        fail: bool,
        lbs_seen: usize,
        /// Takes services read whole before the cold read is over.
        early: bool,
    }

    impl Applier for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn apply(
            &mut self,
            desired: &Desired,
            changed: &Changed,
            everything: bool,
        ) -> anyhow::Result<ApplyStats> {
            self.calls.push((changed.clone(), everything));
            if self.fail {
                anyhow::bail!("the kernel said no");
            }
            self.lbs_seen = desired.lbs.len();
            Ok(ApplyStats {
                writes: changed.lbs.len() + changed.sandboxes.len(),
                deletes: 0,
            })
        }
        fn applies_early(&self) -> bool {
            self.early
        }
    }

    fn reconciler(fake: Arc<Mutex<Fake>>) -> Reconciler {
        let slots = vec![Slot::new(fake)];
        let mut r = Reconciler::new(Arc::default(), slots, Arc::default());
        // Both sources read: a local container on n1 (compile serves only networks a local
        // container is on), nothing else yet.
        r.step(vec![local_read(), swarm_read()]);
        r
    }

    /// This node's containers read whole: one, on n1 (compile serves only networks a local
    /// container is on).
    fn local_read() -> Update {
        Update {
            changes: vec![Change::PutSandbox(sandbox("c0", 4, &["n1"]))],
            origin: None,
            read_at: None,
            from: Origin::Local,
            complete: true,
        }
    }

    /// The swarm read whole (nothing more in it).
    fn swarm_read() -> Update {
        Update {
            changes: vec![],
            origin: None,
            read_at: None,
            from: Origin::Swarm,
            complete: true,
        }
    }

    fn swarm(changes: Vec<Change>) -> Update {
        Update {
            changes,
            origin: Some(Instant::now()),
            read_at: None,
            from: Origin::Swarm,
            complete: false,
        }
    }

    #[test]
    fn nothing_is_applied_before_every_source_was_read_whole() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let mut r = Reconciler::new(
            Arc::default(),
            vec![Slot::new(fake.clone())],
            Arc::default(),
        );
        r.step(vec![swarm(vec![Change::PutNetwork(net("n1"))])]);
        r.step(vec![local_read()]);
        r.retry();
        assert!(
            fake.lock().unwrap().calls.is_empty(),
            "half a picture must not be applied"
        );
        r.step(vec![Update {
            changes: vec![Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])]))],
            origin: None,
            read_at: None,
            from: Origin::Swarm,
            complete: true,
        }]);
        let f = fake.lock().unwrap();
        assert_eq!(f.calls.len(), 1);
        assert!(f.calls[0].1, "the first apply is a sweep");
        assert_eq!(f.lbs_seen, 1);
    }

    /// During a cold read, the kernel maps get a service's load balancer once its tasks are
    /// read, and never one whose tasks are not (it would have no backends: connections to
    /// its VIP would be refused until the read is over).
    #[test]
    fn services_read_whole_are_applied_early_and_no_others() {
        let fake = Arc::new(Mutex::new(Fake {
            early: true,
            ..Fake::default()
        }));
        let mut r = Reconciler::new(
            Arc::default(),
            vec![Slot::new(fake.clone())],
            Arc::default(),
        );
        let tasks = |s: &str, t: &str, ip: u8| Change::ServiceTasks {
            service_id: s.into(),
            tasks: vec![task(t, s, "a", "n1", [10, 0, 0, ip])],
        };
        r.step(vec![swarm(vec![
            Change::PutNetwork(net("n1")),
            Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])])),
            Change::PutService(svc("s2", &[("n1", [10, 0, 0, 3])])),
            tasks("s2", "t2", 6),
        ])]);
        assert!(
            fake.lock().unwrap().calls.is_empty(),
            "this node's containers are not read yet: they may hold tasks back"
        );
        r.step(vec![local_read()]);
        let services = |c: &Changed| -> Vec<String> {
            c.lbs.iter().map(|l| l.service_id.to_string()).collect()
        };
        let before = {
            let f = fake.lock().unwrap();
            // s2 was read whole: it may go now; s1 may not.
            assert!(f.calls.iter().all(|(c, _)| services(c) == ["s2"]));
            f.calls.len()
        };
        r.step(vec![swarm(vec![tasks("s1", "t1", 5)])]);
        {
            let f = fake.lock().unwrap();
            assert_eq!(f.calls.len(), before + 1);
            let (changed, everything) = f.calls.last().unwrap();
            assert!(!everything, "never a sweep before all is read");
            assert_eq!(services(changed), ["s1"]);
            assert!(changed.sandboxes.is_empty() && changed.networks.is_empty());
        }
        r.step(vec![swarm_read()]);
        let f = fake.lock().unwrap();
        assert_eq!(f.calls.len(), before + 2);
        assert!(f.calls.last().unwrap().1, "the first full apply sweeps");
        assert_eq!(f.lbs_seen, 2);
    }

    #[test]
    fn a_step_applies_what_the_updates_touched_and_records_the_latency() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let mut r = reconciler(fake.clone());
        r.sweep();
        let step = r.step(vec![
            swarm(vec![Change::PutNetwork(net("n1"))]),
            swarm(vec![
                Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])])),
                Change::PutTask(task("t1", "s1", "a", "n1", [10, 0, 0, 5])),
            ]),
        ]);
        assert_eq!(step.changes, 3);
        let f = fake.lock().unwrap();
        let (changed, everything) = f.calls.last().unwrap();
        assert!(!everything);
        assert_eq!(changed.lbs.len(), 1, "one load balancer");
        assert_eq!(f.lbs_seen, 1);
        assert_eq!(r.status.lock().unwrap().event_to_map.len(), 1);
    }

    #[test]
    fn a_failed_apply_keeps_its_changes_for_the_retry_with_a_sweep() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let mut r = reconciler(fake.clone());
        r.sweep();
        fake.lock().unwrap().fail = true;
        r.step(vec![swarm(vec![
            Change::PutNetwork(net("n1")),
            Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])])),
        ])]);
        r.step(vec![swarm(vec![Change::PutService(svc(
            "s2",
            &[("n1", [10, 0, 0, 3])],
        ))])]);
        assert!(r.status.lock().unwrap().appliers[0].pending);
        fake.lock().unwrap().fail = false;
        r.retry();
        let f = fake.lock().unwrap();
        let (changed, everything) = f.calls.last().unwrap();
        // Both services' load balancers, though the first failed twice, and a sweep.
        assert_eq!(changed.lbs.len(), 2);
        assert!(everything);
        assert_eq!(f.lbs_seen, 2);
        assert!(!r.status.lock().unwrap().appliers[0].pending);
        // Nothing pending: a retry does not call the applier at all.
        let calls = f.calls.len();
        drop(f);
        r.retry();
        assert_eq!(fake.lock().unwrap().calls.len(), calls);
    }

    #[test]
    fn a_managers_step_feeds_swarm_changes_but_not_local_containers() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let mut r = reconciler(fake);
        r.node_id = "me".into();
        r.core.write().unwrap().feed = Some(crate::feed::FeedLog::new());
        r.step(vec![
            swarm(vec![Change::PutNetwork(net("n1"))]),
            Update {
                changes: vec![Change::PutSandbox(sandbox("c1", 5, &["n1"]))],
                origin: None,
                read_at: None,
                from: Origin::Local,
                complete: false,
            },
        ]);
        let core = r.core.read().unwrap();
        let feed = core.feed.as_ref().unwrap();
        assert_eq!(feed.seq, 1, "one batch");
        let batch = feed.since(0).unwrap();
        let text = String::from_utf8_lossy(&batch[0].1[4..]).to_string();
        assert!(
            text.contains("PutNetwork") && text.contains("PutReport"),
            "{text}"
        );
        assert!(!text.contains("PutSandbox"));
        assert!(core.state.reports.contains_key("me"));
    }
}
