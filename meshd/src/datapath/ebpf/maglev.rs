//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), for the per-packet ingress path
//! (the next datapath), where every node and every restart must pick the same backend for a
//! flow. Socket-level VIPs do not need it: a socket picks once, from the dense backend array.
//!
//! Each backend walks its own permutation of the table's slots and the backends take turns
//! claiming free slots, so every backend ends up with an almost equal share, and adding or
//! removing one backend moves only about its own share of slots. The hashes are fixed
//! (FNV-1a then a mixer), never `std`'s randomised hasher: a restarted meshd must compute the
//! very table it left pinned in the kernel.
use meshd_common::mix64;

/// The table size for `backends` backends: the smallest prime at least 100 × the next power
/// of two. Sizes move in doublings, so scaling between 5 and 8 tasks keeps one table size and
/// Maglev's minimal disruption holds; 0 for no backends.
pub fn table_size(backends: usize) -> u32 {
    if backends == 0 {
        return 0;
    }
    let floor = 100u64 * backends.next_power_of_two() as u64;
    let mut candidate = floor;
    while !is_prime(candidate) {
        candidate += 1;
    }
    u32::try_from(candidate).expect("Maglev table size fits u32")
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills a table of `size` slots (a prime) with indices into `backends`, each backend
/// named by stable bytes (its address). Empty when there are no backends.
pub fn build<B: AsRef<[u8]>>(backends: &[B], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let (offsets, skips): (Vec<u64>, Vec<u64>) = backends
        .iter()
        .map(|b| {
            let h = fnv1a(b.as_ref());
            (mix64(h) % m, mix64(h ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1)
        })
        .unzip();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    'fill: loop {
        for i in 0..n {
            let mut slot = ((offsets[i] + next[i] * skips[i]) % m) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offsets[i] + next[i] * skips[i]) % m) as usize;
            }
            table[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == table.len() {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 2))
            .collect()
    }

    #[test]
    fn sizes_are_primes_of_at_least_100_per_backend() {
        assert_eq!(table_size(0), 0);
        for n in 1..300 {
            let m = table_size(n);
            assert!(is_prime(u64::from(m)), "{m} not prime");
            assert!(m as usize >= 100 * n, "{m} < 100 × {n}");
        }
        assert_eq!(table_size(3), table_size(4), "sizes move in doublings");
    }

    #[test]
    fn one_backend_owns_the_whole_table() {
        let t = build(&names(1), table_size(1));
        assert!(t.iter().all(|&b| b == 0));
    }

    proptest! {
        #[test]
        fn every_backend_gets_its_share(n in 1usize..64) {
            let m = table_size(n);
            let t = build(&names(n), m);
            prop_assert_eq!(t.len(), m as usize);
            let mut counts = vec![0usize; n];
            for &b in &t { counts[b as usize] += 1; }
            let fair = m as f64 / n as f64;
            for c in counts {
                // Maglev's round-robin claiming keeps every share within one slot of
                // another in the ideal case; allow a few percent.
                prop_assert!((c as f64 - fair).abs() <= fair * 0.03 + 1.0,
                    "share {} vs fair {:.1} (n={}, m={})", c, fair, n, m);
            }
        }

        #[test]
        fn removing_one_backend_moves_about_its_share(n in 2usize..64, gone in 0usize..64) {
            let gone = gone % n;
            let all = names(n);
            // Same table size before and after, as in production within a doubling.
            let m = table_size(n);
            let before = build(&all, m);
            let mut rest = all.clone();
            rest.remove(gone);
            let after = build(&rest, m);
            let mut moved = 0usize;
            for (slot, &b) in before.iter().enumerate() {
                let old_name = &all[b as usize];
                let new_name = &rest[after[slot] as usize];
                if old_name != new_name { moved += 1; }
            }
            let share = m as f64 / n as f64;
            // The removed backend's slots must move. Maglev's refill moves some more: measured
            // over every removal for n in 2..64, 1.77× the share on average, 2.45× at worst,
            // against (n-1)/n of the table for modulo hashing.
            prop_assert!(moved as f64 >= share * 0.97 - 1.0);
            prop_assert!((moved as f64) <= share * 2.5 + 2.0,
                "moved {} slots, share {:.1} (n={}, m={})", moved, share, n, m);
        }
    }
}
