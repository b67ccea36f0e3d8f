//! How long queries spend in the server, as a histogram of fixed buckets kept in atomics.
//! The answer path observes a whole receive batch at once (`observe_n`: every query of a
//! batch waited the same time), so measuring costs two clock reads per batch, not a lock
//! per query; the metrics endpoint reads a snapshot.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Upper bounds: 10 µs doubling up to about 5 s; anything slower is counted in +Inf.
const BOUNDS: usize = 20;
const FIRST_NS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct Latency {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BOUNDS + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A copy of a `Latency`, in seconds, with per-bucket counts (+Inf last).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyView {
    pub count: u64,
    pub sum_seconds: f64,
    pub buckets: Vec<(f64, u64)>,
}

fn bucket_of(ns: u64) -> usize {
    // The first bound at or above `ns`: bound i is FIRST_NS << i.
    (0..BOUNDS).find(|&i| ns <= FIRST_NS << i).unwrap_or(BOUNDS)
}

impl Latency {
    /// `n` queries that each took `took`.
    pub fn observe_n(&self, took: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
    }

    pub fn observe(&self, took: Duration) {
        self.observe_n(took, 1);
    }

    /// The sum of several (per-worker copies of one histogram).
    pub fn view_of<'a>(all: impl IntoIterator<Item = &'a Latency>) -> LatencyView {
        let mut total = Latency::default().view();
        for l in all {
            let v = l.view();
            total.count += v.count;
            total.sum_seconds += v.sum_seconds;
            for (t, b) in total.buckets.iter_mut().zip(&v.buckets) {
                t.1 += b.1;
            }
        }
        total
    }

    pub fn view(&self) -> LatencyView {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bound = if i < BOUNDS {
                    (FIRST_NS << i) as f64 / 1e9
                } else {
                    f64::INFINITY
                };
                (bound, b.load(Ordering::Relaxed))
            })
            .collect();
        LatencyView {
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let l = Latency::default();
        l.observe(Duration::from_micros(10)); // exactly the first bound
        l.observe_n(Duration::from_micros(15), 3); // 20 µs bucket
        l.observe(Duration::from_secs(60)); // beyond every bound
        let v = l.view();
        assert_eq!(v.count, 5);
        assert_eq!(v.buckets.len(), BOUNDS + 1);
        assert_eq!(v.buckets[0], (0.000_01, 1));
        assert_eq!(v.buckets[1], (0.000_02, 3));
        assert_eq!(v.buckets[BOUNDS], (f64::INFINITY, 1));
        assert_eq!(v.buckets.iter().map(|b| b.1).sum::<u64>(), 5);
        assert!((v.sum_seconds - (0.000_01 + 3.0 * 0.000_015 + 60.0)).abs() < 1e-9);
    }

    #[test]
    fn copies_sum_bucket_by_bucket() {
        let (a, b) = (Latency::default(), Latency::default());
        a.observe(Duration::from_micros(10));
        b.observe(Duration::from_micros(10));
        b.observe(Duration::from_secs(60));
        let v = Latency::view_of([&a, &b]);
        assert_eq!(v.count, 3);
        assert_eq!(v.buckets[0], (0.000_01, 2));
        assert_eq!(v.buckets[BOUNDS], (f64::INFINITY, 1));
        assert_eq!(Latency::view_of([]).count, 0);
    }

    #[test]
    fn bounds_double_up_to_about_five_seconds() {
        let v = Latency::default().view();
        let last = v.buckets[BOUNDS - 1].0;
        assert!((5.0..6.0).contains(&last), "{last}");
        for w in v.buckets.windows(2) {
            assert!(w[1].0 > w[0].0);
        }
    }
}
