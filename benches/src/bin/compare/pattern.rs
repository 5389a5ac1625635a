//! Access patterns and what a run measured.

use fastrand::Rng;

/// Byte offsets for one run.
pub enum Pattern {
    /// Uniformly random `bs`-aligned offsets (with repeats).
    Random { rng: Rng, blocks: u64, bs: u64 },
    /// Every `bs` block once, in random order; then exhausted.
    Once {
        order: Vec<u32>,
        next: usize,
        bs: u64,
    },
    /// Consecutive `bs` requests, wrapping at the end.
    Seq { pos: u64, blocks: u64, bs: u64 },
}

impl Pattern {
    pub fn random(size: u64, bs: u64, seed: u64) -> Pattern {
        Pattern::Random {
            rng: Rng::with_seed(seed),
            blocks: size / bs,
            bs,
        }
    }

    pub fn once(size: u64, bs: u64, seed: u64) -> Pattern {
        let mut order: Vec<u32> = (0..(size / bs) as u32).collect();
        Rng::with_seed(seed).shuffle(&mut order);
        Pattern::Once { order, next: 0, bs }
    }

    pub fn seq(size: u64, bs: u64) -> Pattern {
        Pattern::Seq {
            pos: 0,
            blocks: size / bs,
            bs,
        }
    }

    /// Splits the pattern into `n` disjoint ones, one per queue: random
    /// offsets with seeds of their own; every block once, dealt out in
    /// turn; sequential, in `n` consecutive parts of the range.
    pub fn split(self, n: usize) -> Vec<Pattern> {
        if n <= 1 {
            return vec![self];
        }
        match self {
            Pattern::Random { rng, blocks, bs } => (0..n)
                .map(|i| Pattern::Random {
                    rng: Rng::with_seed(rng.clone().u64(..) ^ (i as u64 + 1)),
                    blocks,
                    bs,
                })
                .collect(),
            Pattern::Once { order, next, bs } => (0..n)
                .map(|i| Pattern::Once {
                    order: order[next..].iter().skip(i).step_by(n).copied().collect(),
                    next: 0,
                    bs,
                })
                .collect(),
            Pattern::Seq { pos, blocks, bs } => {
                let part = (blocks / n as u64).max(1);
                (0..n as u64)
                    .map(|i| Pattern::Seq {
                        pos: (pos + i * part) % blocks,
                        blocks,
                        bs,
                    })
                    .collect()
            }
        }
    }

    /// The next offset, or `None` when a `Once` pattern is used up.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<u64> {
        match self {
            Pattern::Random { rng, blocks, bs } => Some(rng.u64(..*blocks) * *bs),
            Pattern::Once { order, next, bs } => {
                let b = *order.get(*next)?;
                *next += 1;
                Some(b as u64 * *bs)
            }
            Pattern::Seq { pos, blocks, bs } => {
                let at = *pos;
                *pos = (*pos + 1) % *blocks;
                Some(at * *bs)
            }
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    pub ios: u64,
    pub secs: f64,
    /// Per-request latency percentiles in microseconds, where known.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// CPU time of the storage stack per request (the server for
    /// vhost-user-blk, the process otherwise), where known.
    pub cpu_us_per_io: Option<f64>,
    /// Context switches per request, where known: the storage stack's
    /// (fio's own, or the server's threads) and, over vhost-user, the
    /// client's (the guest's side). Each is a sleep and a wake-up.
    pub switches_per_io: Option<f64>,
    pub client_switches_per_io: Option<f64>,
    /// Resident set size of the server at the end of the run.
    pub server_rss: Option<u64>,
    /// The pattern ran out (every block written once) before the time was up.
    pub exhausted: bool,
    pub note: String,
}

impl Measured {
    /// From per-request latencies (µs), over `secs` of wall time.
    pub fn from_latencies(mut lat: Vec<f64>, secs: f64, exhausted: bool) -> Measured {
        let ios = lat.len() as u64;
        let (p50, p99) = percentiles(&mut lat);
        Measured {
            ios,
            secs,
            p50_us: p50,
            p99_us: p99,
            exhausted,
            ..Measured::default()
        }
    }

    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ios as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// (p50, p99) of a sample, sorting it.
pub fn percentiles(v: &mut [f64]) -> (Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (Some(at(0.5)), Some(at(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut Pattern) -> Vec<u64> {
        std::iter::from_fn(|| p.next()).collect()
    }

    #[test]
    fn split_once_deals_every_block_exactly_once() {
        let mut whole = Pattern::once(64 * 4096, 4096, 5);
        let mut all = drain(&mut whole);
        let mut parts: Vec<u64> = Pattern::once(64 * 4096, 4096, 5)
            .split(2)
            .iter_mut()
            .flat_map(drain)
            .collect();
        all.sort_unstable();
        parts.sort_unstable();
        assert_eq!(all, parts);
    }

    #[test]
    fn split_random_and_seq_give_different_streams() {
        let mut r = Pattern::random(1 << 30, 4096, 9).split(2);
        let a: Vec<u64> = (0..8).filter_map(|_| r[0].next()).collect();
        let b: Vec<u64> = (0..8).filter_map(|_| r[1].next()).collect();
        assert_ne!(a, b);
        let mut s = Pattern::seq(8 << 20, 1 << 20).split(2);
        assert_eq!(s[0].next(), Some(0));
        assert_eq!(s[1].next(), Some(4 << 20));
    }
}
