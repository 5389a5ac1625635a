//! Free-space map of the data area: one bit per 4 KiB block, a free count
//! per chunk, and allocation cursors that fill one chunk at a time so each
//! writer's data stays contiguous.

use crate::format::Layout;

/// Where a writer (a volume, or the metadata writer) allocates next.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    /// Next block to try; 0 = no current chunk.
    next: u64,
}

pub struct SpaceMap {
    data_start: u64,
    chunk_blocks: u64,
    chunks: u64,
    used: Vec<u64>,
    chunk_free: Vec<u32>,
    free_blocks: u64,
    /// Hint: no chunk below this index is entirely free.
    empty_hint: u64,
    /// On a shared pool, chunks of allocation groups this host has not
    /// claimed: they look full here, and frees landing in them are left
    /// to the group's owner to find (at its next reload).
    foreign: Option<Vec<bool>>,
    /// Blocks counted as in use although no bit says where: what the
    /// unreadable parts of damaged trees map (docs/FORMAT.md 5.1). The
    /// last `withheld` free blocks are never handed out.
    withheld: u64,
}

/// A block already in use was claimed again (corruption or a bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoubleUse(pub u64);

impl SpaceMap {
    pub fn new(layout: &Layout) -> SpaceMap {
        let chunks = layout.data_chunks();
        let chunk_blocks = layout.chunk_blocks as u64;
        let blocks = chunks * chunk_blocks;
        SpaceMap {
            data_start: layout.data_start,
            chunk_blocks,
            chunks,
            used: vec![0; blocks.div_ceil(64) as usize],
            chunk_free: vec![chunk_blocks as u32; chunks as usize],
            free_blocks: blocks,
            empty_hint: 0,
            foreign: None,
            withheld: 0,
        }
    }

    /// Allows allocation only in chunks for which `owned` is true (the
    /// allocation groups this host claimed). Called once, after the map
    /// was built from every tree on the LUN.
    pub fn restrict(&mut self, owned: &dyn Fn(u64) -> bool) {
        self.foreign = Some(vec![false; self.chunks as usize]);
        for c in (0..self.chunks).filter(|&c| !owned(c)) {
            self.make_foreign(c);
        }
        self.empty_hint = 0;
    }

    /// Chunk `c` (of a group this host does not own) reads as full.
    fn make_foreign(&mut self, c: u64) {
        if let Some(f) = self.foreign.as_mut() {
            f[c as usize] = true;
        }
        self.free_blocks -= self.chunk_free[c as usize] as u64;
        self.chunk_free[c as usize] = 0;
        let start = c * self.chunk_blocks;
        for (w, mask, _) in pieces(start, self.chunk_blocks, self.chunk_blocks) {
            self.used[w] |= mask;
        }
    }

    /// Stops allocating in chunks `range` (a group handed back): they read
    /// as full from now on.
    pub fn disown_chunks(&mut self, range: std::ops::Range<u64>) {
        if self.foreign.is_none() {
            return;
        }
        for c in range.start..range.end.min(self.chunks) {
            self.make_foreign(c);
        }
    }

    /// Free blocks per chunk, as the map stands (for choosing groups).
    pub fn chunk_free_blocks(&self) -> &[u32] {
        &self.chunk_free
    }

    fn is_foreign(&self, c: usize) -> bool {
        self.foreign.as_ref().is_some_and(|f| f[c])
    }

    pub fn total_blocks(&self) -> u64 {
        self.chunks * self.chunk_blocks
    }

    /// Free blocks the allocator may hand out.
    pub fn free_blocks(&self) -> u64 {
        self.free_blocks.saturating_sub(self.withheld)
    }

    /// Counts `n` more blocks as in use without knowing where they are.
    pub fn withhold(&mut self, n: u64) {
        self.withheld = self.withheld.saturating_add(n);
    }

    pub fn withheld(&self) -> u64 {
        self.withheld
    }

    fn bit(&self, i: u64) -> bool {
        self.used[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Marks a run used; fails (changing nothing) if any block already was.
    pub fn mark_used(&mut self, pblock: u64, len: u64) -> Result<(), DoubleUse> {
        let start = pblock - self.data_start;
        for (w, mask, _) in pieces(start, len, self.chunk_blocks) {
            let clash = self.used[w] & mask;
            if clash != 0 {
                let first = w as u64 * 64 + clash.trailing_zeros() as u64;
                return Err(DoubleUse(self.data_start + first));
            }
        }
        for (w, mask, c) in pieces(start, len, self.chunk_blocks) {
            self.used[w] |= mask;
            self.chunk_free[c] -= mask.count_ones();
        }
        self.free_blocks -= len;
        Ok(())
    }

    /// Marks a run used where it is free; pushes the runs that already were
    /// in use to `already` (data shared by several mapping leaves).
    pub fn mark_or_share(&mut self, pblock: u64, len: u64, already: &mut Vec<(u64, u64)>) {
        let start = pblock - self.data_start;
        for (w, mask, c) in pieces(start, len, self.chunk_blocks) {
            let old = self.used[w] & mask;
            let new = mask & !old;
            self.used[w] |= new;
            self.chunk_free[c] -= new.count_ones();
            self.free_blocks -= new.count_ones() as u64;
            let mut bits = old;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                let run = (bits >> b).trailing_ones() as u64;
                let at = self.data_start + w as u64 * 64 + b;
                match already.last_mut() {
                    Some((p, n)) if *p + *n == at => *n += run,
                    _ => already.push((at, run)),
                }
                bits &= !(if run == 64 {
                    u64::MAX
                } else {
                    ((1u64 << run) - 1) << b
                });
            }
        }
    }

    /// Returns a run to the free pool (blocks already free are ignored).
    pub fn release(&mut self, pblock: u64, len: u64) {
        let start = pblock - self.data_start;
        for (w, mask, c) in pieces(start, len, self.chunk_blocks) {
            if self.is_foreign(c) {
                continue;
            }
            let n = (self.used[w] & mask).count_ones();
            self.used[w] &= !mask;
            self.chunk_free[c] += n;
            self.free_blocks += n as u64;
            if self.chunk_free[c] as u64 == self.chunk_blocks {
                self.empty_hint = self.empty_hint.min(c as u64);
            }
        }
    }

    /// Runs of free blocks (absolute block numbers), in order.
    pub fn free_runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in self.used.iter().enumerate() {
            if word == u64::MAX {
                continue;
            }
            let mut free = !word;
            let base = w as u64 * 64;
            while free != 0 {
                let b = free.trailing_zeros() as u64;
                let run = (free >> b).trailing_ones() as u64;
                let at = base + b;
                if at >= self.total_blocks() {
                    break;
                }
                let run = run.min(self.total_blocks() - at);
                match out.last_mut() {
                    Some((p, n)) if *p + *n == self.data_start + at => *n += run,
                    _ => out.push((self.data_start + at, run)),
                }
                free &= !(if b + run >= 64 {
                    u64::MAX << b
                } else {
                    ((1u64 << run) - 1) << b
                });
            }
        }
        out
    }

    /// Extends the map to a grown data area (new chunks are free).
    pub fn grow(&mut self, layout: &Layout) {
        let chunks = layout.data_chunks();
        if chunks <= self.chunks {
            return;
        }
        let blocks = chunks * self.chunk_blocks;
        let added = blocks - self.total_blocks();
        self.used.resize(blocks.div_ceil(64) as usize, 0);
        self.chunk_free
            .resize(chunks as usize, self.chunk_blocks as u32);
        self.empty_hint = self.empty_hint.min(self.chunks);
        let old_chunks = self.chunks;
        self.chunks = chunks;
        self.free_blocks += added;
        if let Some(f) = self.foreign.as_mut() {
            // New space belongs to no host until one claims its group.
            f.resize(chunks as usize, true);
            for c in old_chunks..chunks {
                self.make_foreign(c);
            }
        }
    }

    fn set(&mut self, i: u64) {
        self.used[(i / 64) as usize] |= 1 << (i % 64);
        self.chunk_free[(i / self.chunk_blocks) as usize] -= 1;
        self.free_blocks -= 1;
    }

    /// Allocates up to `want` contiguous blocks for `cursor`, preferring the
    /// cursor's chunk, then an empty chunk, then any chunk with free space.
    /// Returns (first block, count) or None when the data area is full.
    pub fn allocate_run(&mut self, cursor: &mut Cursor, want: u64) -> Option<(u64, u64)> {
        let want = want.min(self.free_blocks());
        if want == 0 {
            return None;
        }
        loop {
            if let Some(run) = self.take_in_chunk(cursor, want) {
                return Some(run);
            }
            let c = self.pick_chunk()?;
            cursor.next = self.data_start + c * self.chunk_blocks;
        }
    }

    /// Allocates one block for `cursor` in another chunk than block
    /// `near`'s, as far from it as the free space allows: the second copy
    /// of a ditto node, which one bad run of sectors must not take along
    /// with the first. Only when no other chunk has room does it share
    /// `near`'s chunk.
    pub fn allocate_apart(&mut self, cursor: &mut Cursor, near: u64) -> Option<u64> {
        if self.free_blocks() == 0 {
            return None;
        }
        let chunk_of = |b: u64, s: &SpaceMap| (b - s.data_start) / s.chunk_blocks;
        let near_chunk = chunk_of(near, self);
        if cursor.next != 0 && chunk_of(cursor.next, self) != near_chunk {
            if let Some((b, _)) = self.take_in_chunk(cursor, 1) {
                return Some(b);
            }
        }
        let c = self.pick_chunk_apart(near_chunk)?;
        cursor.next = self.data_start + c * self.chunk_blocks;
        self.take_in_chunk(cursor, 1).map(|(b, _)| b)
    }

    /// Two blocks in different chunks (both or neither): one for `first`,
    /// the other [`allocate_apart`](Self::allocate_apart) from it for
    /// `second`. The two copies of a record.
    pub fn allocate_pair(&mut self, first: &mut Cursor, second: &mut Cursor) -> Option<(u64, u64)> {
        let (block, _) = self.allocate_run(first, 1)?;
        match self.allocate_apart(second, block) {
            Some(twin) => Some((block, twin)),
            None => {
                self.release(block, 1);
                None
            }
        }
    }

    /// Takes up to `want` free blocks from the cursor's chunk, at or after
    /// the cursor; None (and the cursor cleared) when there are none.
    fn take_in_chunk(&mut self, cursor: &mut Cursor, want: u64) -> Option<(u64, u64)> {
        if cursor.next == 0 {
            return None;
        }
        let i = cursor.next - self.data_start;
        let chunk_end = (i / self.chunk_blocks + 1) * self.chunk_blocks;
        let mut j = i;
        while j < chunk_end && self.bit(j) {
            j += 1;
        }
        if j == chunk_end {
            cursor.next = 0;
            return None;
        }
        let mut n = 0;
        while n < want && j + n < chunk_end && !self.bit(j + n) {
            self.set(j + n);
            n += 1;
        }
        cursor.next = if j + n < chunk_end {
            self.data_start + j + n
        } else {
            0
        };
        Some((self.data_start + j, n))
    }

    /// An empty chunk, searched from the one half the data area away from
    /// `near`; else the fullest-free chunk but `near`; else `near` itself.
    fn pick_chunk_apart(&self, near: u64) -> Option<u64> {
        let n = self.chunks;
        let full = self.chunk_blocks as u32;
        let free = |c: u64| self.chunk_free[c as usize];
        let from = (near + n / 2) % n;
        (0..n)
            .map(|i| (from + i) % n)
            .find(|&c| c != near && free(c) == full)
            .or_else(|| {
                (0..n)
                    .filter(|&c| c != near && free(c) > 0)
                    .max_by_key(|&c| free(c))
            })
            .or_else(|| (free(near) > 0).then_some(near))
    }

    fn pick_chunk(&mut self) -> Option<u64> {
        let full = self.chunk_blocks as u32;
        while self.empty_hint < self.chunks {
            if self.chunk_free[self.empty_hint as usize] == full {
                return Some(self.empty_hint);
            }
            self.empty_hint += 1;
        }
        // No empty chunk: reuse the chunk with the most free blocks.
        let (c, &free) = self.chunk_free.iter().enumerate().max_by_key(|(_, &f)| f)?;
        (free > 0).then_some(c as u64)
    }
}

/// Splits a run (relative to the data area) into pieces that stay inside
/// one chunk and one bitmap word: (word index, mask, chunk).
fn pieces(start: u64, len: u64, chunk_blocks: u64) -> impl Iterator<Item = (usize, u64, usize)> {
    let end = start + len;
    let mut i = start;
    std::iter::from_fn(move || {
        if i >= end {
            return None;
        }
        let word_end = (i / 64 + 1) * 64;
        let chunk_end = (i / chunk_blocks + 1) * chunk_blocks;
        let stop = end.min(word_end).min(chunk_end);
        let n = stop - i;
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << (i % 64)
        };
        let piece = ((i / 64) as usize, mask, (i / chunk_blocks) as usize);
        i = stop;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        // 4 chunks of 16 blocks after the metadata regions.
        let l = Layout::compute(0, 1 << 20, 16, 1, 64);
        Layout::compute(l.data_start + 64, 1 << 20, 16, 1, 64)
    }

    #[test]
    fn fills_chunk_by_chunk_then_reuses_holes() {
        let l = layout();
        let mut s = SpaceMap::new(&l);
        assert_eq!(s.total_blocks(), 64);
        let mut a = Cursor::default();
        let mut b = Cursor::default();
        let (pa, na) = s.allocate_run(&mut a, 10).unwrap();
        let (pb, _) = s.allocate_run(&mut b, 1).unwrap();
        assert_eq!(na, 10);
        assert_eq!(pa, l.data_start);
        assert_eq!(pb, l.data_start + 16, "second writer gets its own chunk");
        let (pa2, na2) = s.allocate_run(&mut a, 10).unwrap();
        assert_eq!((pa2, na2), (l.data_start + 10, 6), "run stops at chunk end");
        let mut total = 10 + 1 + 6;
        while let Some((_, n)) = s.allocate_run(&mut a, 100) {
            total += n;
        }
        assert_eq!(total, 64);
        assert_eq!(s.free_blocks(), 0);
        s.release(l.data_start + 3, 2);
        assert_eq!(s.allocate_run(&mut b, 5), Some((l.data_start + 3, 2)));
        assert_eq!(
            s.mark_used(l.data_start + 3, 1),
            Err(DoubleUse(l.data_start + 3))
        );
    }

    #[test]
    fn twin_blocks_go_to_another_chunk_half_the_area_away() {
        let l = layout();
        let mut s = SpaceMap::new(&l);
        let (mut meta, mut twin) = (Cursor::default(), Cursor::default());
        let chunk = |b: u64| (b - l.data_start) / 16;
        let (first, _) = s.allocate_run(&mut meta, 1).unwrap();
        let t = s.allocate_apart(&mut twin, first).unwrap();
        assert_eq!((chunk(first), chunk(t)), (0, 2), "two of four chunks away");
        // The twin cursor stays in its chunk while that is not the first's.
        assert_eq!(chunk(s.allocate_apart(&mut twin, first).unwrap()), 2);
        // Fill everything, then free one block of chunk 0: the twin must
        // share that chunk.
        while s.allocate_run(&mut meta, 64).is_some() {}
        s.release(first, 1);
        let near = l.data_start + 5;
        let only = s.allocate_apart(&mut twin, near).unwrap();
        assert_eq!(only, first, "no other chunk has room");
        assert_eq!(s.allocate_apart(&mut twin, near), None);
    }
}
