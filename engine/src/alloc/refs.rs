//! Reference counts of shared data blocks.
//!
//! A data block is referenced by every distinct mapping leaf that maps it
//! (volumes, snapshots and clones share leaves until one of them changes a
//! leaf, which then gets its own copy). The free-space bitmap says "at least
//! one reference"; this map holds the references beyond the first, as
//! ranges, so an unshared pool costs nothing here.

use std::collections::BTreeMap;

/// How a run relates to the ranges (see [`SharedRefs::overlap`]).
enum Overlap {
    None,
    /// (start, end, count) of the one range that holds the whole run.
    Within(u64, u64, u32),
    Other,
}

/// start -> (end, references beyond the first); ranges never overlap.
#[derive(Clone, Debug, Default)]
pub struct SharedRefs {
    ranges: BTreeMap<u64, (u64, u32)>,
}

impl SharedRefs {
    /// Makes `pos` a range boundary (splitting the range that spans it).
    fn split_at(&mut self, pos: u64) {
        let Some((&start, &(end, extra))) = self.ranges.range(..pos).next_back() else {
            return;
        };
        if end > pos {
            self.ranges.insert(start, (pos, extra));
            self.ranges.insert(pos, (end, extra));
        }
    }

    /// The range holding block `b`, as (start, end, references beyond
    /// the first).
    fn containing(&self, b: u64) -> Option<(u64, u64, u32)> {
        self.ranges
            .range(..=b)
            .next_back()
            .filter(|(_, &(e, _))| e > b)
            .map(|(&s, &(e, x))| (s, e, x))
    }

    /// What `start..end` overlaps: nothing, or one range covering it all
    /// (the common cases of a copy-on-write, taken without the general
    /// path's splits, scans and scratch vectors), or something else.
    fn overlap(&self, start: u64, end: u64) -> Overlap {
        match self.containing(start) {
            Some((s, e, x)) if e >= end => Overlap::Within(s, e, x),
            Some(_) => Overlap::Other,
            None if self.ranges.range(start..end).next().is_none() => Overlap::None,
            None => Overlap::Other,
        }
    }

    /// Sets `start..end`, which lies inside the range `s..e` of count `x`,
    /// to count `new` (0 = no range), keeping the outer parts as they were
    /// and joining equal neighbours at the two edges.
    fn set_within(&mut self, (s, e, x): (u64, u64, u32), start: u64, end: u64, new: u32) {
        if s < start {
            self.ranges.insert(s, (start, x));
        } else {
            self.ranges.remove(&s);
        }
        if new > 0 {
            self.ranges.insert(start, (end, new));
        }
        if end < e {
            self.ranges.insert(end, (e, x));
        }
        self.merge_at(start);
        self.merge_at(end);
    }

    /// Joins the range ending at `pos` with the one starting there if
    /// their counts are equal.
    fn merge_at(&mut self, pos: u64) {
        let Some((&ls, &(le, lx))) = self.ranges.range(..pos).next_back() else {
            return;
        };
        if le != pos {
            return;
        }
        if let Some(&(re, rx)) = self.ranges.get(&pos) {
            if rx == lx {
                self.ranges.remove(&pos);
                self.ranges.insert(ls, (re, lx));
            }
        }
    }

    /// Adds one reference to every block of `start..start+len`.
    pub fn add(&mut self, start: u64, len: u64) {
        let end = start + len;
        match self.overlap(start, end) {
            Overlap::None => {
                self.ranges.insert(start, (end, 1));
                self.merge_at(start);
                self.merge_at(end);
                return;
            }
            Overlap::Within(s, e, x) => return self.set_within((s, e, x), start, end, x + 1),
            Overlap::Other => {}
        }
        self.split_at(start);
        self.split_at(end);
        let mut pos = start;
        let covered: Vec<(u64, u64)> = self
            .ranges
            .range(start..end)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        for (s, e) in covered {
            if s > pos {
                self.ranges.insert(pos, (s, 1));
            }
            if let Some(r) = self.ranges.get_mut(&s) {
                r.1 += 1;
            }
            pos = e;
        }
        if pos < end {
            self.ranges.insert(pos, (end, 1));
        }
        self.merge_around(start, end);
    }

    /// Drops one reference from every block of `start..start+len`; pushes
    /// the runs whose last reference went (to be freed) to `freed`.
    pub fn release(&mut self, start: u64, len: u64, freed: &mut Vec<(u64, u64)>) {
        let end = start + len;
        match self.overlap(start, end) {
            Overlap::None => return freed.push((start, len)),
            Overlap::Within(s, e, x) => return self.set_within((s, e, x), start, end, x - 1),
            Overlap::Other => {}
        }
        self.split_at(start);
        self.split_at(end);
        let mut pos = start;
        let covered: Vec<(u64, u64, u32)> = self
            .ranges
            .range(start..end)
            .map(|(&s, &(e, x))| (s, e, x))
            .collect();
        for (s, e, extra) in covered {
            if s > pos {
                freed.push((pos, s - pos));
            }
            if extra == 1 {
                self.ranges.remove(&s);
            } else if let Some(r) = self.ranges.get_mut(&s) {
                r.1 -= 1;
            }
            pos = e;
        }
        if pos < end {
            freed.push((pos, end - pos));
        }
        self.merge_around(start, end);
    }

    /// Splits `start..start+len` into runs that are shared (true) or not.
    pub fn runs(&self, start: u64, len: u64, out: &mut Vec<(u64, u64, bool)>) {
        let end = start + len;
        let mut pos = start;
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .filter(|(_, &(e, _))| e > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for (&s, &(e, _)) in self.ranges.range(first..end) {
            let s = s.max(start);
            if s > pos {
                out.push((pos, s - pos, false));
            }
            let e = e.min(end);
            out.push((s, e - s, true));
            pos = e;
        }
        if pos < end {
            out.push((pos, end - pos, false));
        }
    }

    /// References beyond the first of block `b`.
    #[cfg(test)]
    pub fn extra(&self, b: u64) -> u32 {
        self.ranges
            .range(..=b)
            .next_back()
            .filter(|(_, &(e, _))| e > b)
            .map_or(0, |(_, &(_, x))| x)
    }

    /// Re-joins equal neighbours around a changed range.
    fn merge_around(&mut self, start: u64, end: u64) {
        let lo = self
            .ranges
            .range(..start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let keys: Vec<u64> = self.ranges.range(lo..=end).map(|(&s, _)| s).collect();
        for k in keys {
            let Some(&(e, x)) = self.ranges.get(&k) else {
                continue;
            };
            if let Some(&(e2, x2)) = self.ranges.get(&e) {
                if x2 == x {
                    self.ranges.remove(&e);
                    self.ranges.insert(k, (e2, x));
                }
            }
        }
    }

    /// References beyond the first, summed over all blocks.
    pub fn extra_total(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(&s, &(e, x))| (e - s) * x as u64)
            .sum()
    }

    /// Blocks with more than one reference.
    pub fn shared_blocks(&self) -> u64 {
        self.ranges.iter().map(|(&s, &(e, _))| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_per_block_counts(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 1u64..50), 1..200)) {
            let mut r = SharedRefs::default();
            // Model: reference counts of blocks that are in use (>= 1).
            let mut model = vec![1u32; 260];
            for (add, s, n) in ops {
                // Both only ever apply to blocks that are in use.
                if (s..s + n).any(|b| model[b as usize] == 0) { continue; }
                if add {
                    r.add(s, n);
                    for b in s..s + n { model[b as usize] += 1; }
                } else {
                    let mut freed = Vec::new();
                    r.release(s, n, &mut freed);
                    for b in s..s + n { model[b as usize] -= 1; }
                    let mut got: Vec<u64> = freed.iter().flat_map(|&(p, l)| p..p + l).collect();
                    got.sort();
                    let want: Vec<u64> = (s..s + n).filter(|&b| model[b as usize] == 0).collect();
                    prop_assert_eq!(got, want);
                }
            }
            for b in 0..260u64 {
                prop_assert_eq!(r.extra(b), model[b as usize].saturating_sub(1));
            }
            // Equal neighbours are always joined: the map stays minimal.
            let v: Vec<(u64, u64, u32)> = r.ranges.iter().map(|(&s, &(e, x))| (s, e, x)).collect();
            for w in v.windows(2) {
                prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2), "{:?}", w);
            }
        }
    }
}
