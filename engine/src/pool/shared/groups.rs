//! Allocation-group claims: the claim table, narrowing a host's space to
//! its own groups, claiming more and returning a spare one.

use crate::dev::read_blocks;
use crate::dev::{write_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::claims::{self, Claim, CLAIMS_PER_BLOCK};
use crate::format::Layout;
use crate::map::state::State;
use crate::pool::Inner;

/// Reads the claims of the pool's current groups (the table is sized for
/// the largest the pool may grow to; only its head is in use), in one I/O.
pub(crate) fn read_claims(dev: &dyn BlockDevice, layout: &Layout) -> Result<Vec<Claim>> {
    let groups = layout.groups() as usize;
    let blocks = groups.div_ceil(CLAIMS_PER_BLOCK).max(1) as u64;
    let table: Vec<u64> = (0..blocks.min(layout.ag_table_blocks))
        .map(|i| layout.ag_table_start + i)
        .collect();
    let buf = read_blocks(dev, &table, "reading the claim table")?;
    let mut out = Vec::new();
    for (i, &at) in table.iter().enumerate() {
        out.extend(claims::decode(&buf[i], at, layout.max_hosts)?);
    }
    out.truncate(groups);
    Ok(out)
}

pub(super) fn write_claims(
    dev: &dyn BlockDevice,
    layout: &Layout,
    all: &[Claim],
    seq: u64,
) -> Result<()> {
    let writes: Vec<(u64, Vec<u8>)> = all
        .chunks(CLAIMS_PER_BLOCK)
        .enumerate()
        .map(|(i, c)| {
            let at = layout.ag_table_start + i as u64;
            (at, claims::encode(c, seq, at))
        })
        .collect();
    write_blocks(dev, &writes).map_err(|e| Error::io("writing the claim table", e))?;
    dev.flush()
        .map_err(|e| Error::io("flushing the claim table", e))
}

/// Narrows a freshly loaded state to the groups `owner` claimed and
/// returns the free blocks of every group before narrowing.
pub(crate) fn restrict_to_claims(st: &mut State, all: &[Claim], owner: u32) -> Vec<u64> {
    let l = st.sb.layout;
    let per_group = (l.ag_blocks / l.chunk_blocks) as u64;
    let free = st.space.chunk_free_blocks();
    let mut group_free = vec![0u64; l.groups() as usize];
    for (c, &f) in free.iter().enumerate() {
        if let Some(g) = group_free.get_mut(c / per_group as usize) {
            *g += f as u64;
        }
    }
    let owned = |c: u64| {
        all.get((c / per_group) as usize)
            .is_some_and(|cl| cl.owner as u32 == owner)
    };
    st.space.restrict(&owned);
    group_free
}

impl Inner {
    /// Claims one more allocation group when this host runs low on space.
    /// Returns whether it got one.
    pub(crate) fn claim_more_space(&self) -> bool {
        if self.shared.is_none() {
            return false;
        }
        let before = self.state.lock().space.free_blocks();
        let r = (|| -> Result<bool> {
            let _g = self.global()?;
            if self.state.lock().space.free_blocks() > before {
                return Ok(true); // the reload found space freed elsewhere
            }
            self.claim_group_locked()
        })();
        r.unwrap_or(false)
    }

    /// With the global lock held: claims the unclaimed group with the most
    /// free blocks and reloads so this host may allocate there.
    pub(crate) fn claim_group_locked(&self) -> Result<bool> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(false);
        };
        let layout = self.state.lock().sb.layout;
        let mut claims = read_claims(self.dev.as_ref(), &layout)?;
        let free = sh.group_free.lock().clone();
        let best = claims
            .iter()
            .enumerate()
            .filter(|(_, c)| c.owner == 0)
            .map(|(g, _)| (free.get(g).copied().unwrap_or(0), g))
            .filter(|&(f, _)| f > 0)
            .max();
        let Some((_, g)) = best else {
            return Ok(false);
        };
        claims[g].owner = self.host_id as u16;
        claims[g].generation += 1;
        let gen = self.state.lock().sb.generation + 1;
        write_claims(self.dev.as_ref(), &layout, &claims, gen)?;
        // Reload to allocate in the new group, then bump the superblock
        // generation (which needs a block there) so others reload too.
        self.reload(&[])?;
        let _ctl = self.commit.lock();
        let mut st = self.state.lock();
        self.write_catalog(&mut st)?;
        Ok(true)
    }

    /// The background thread's claim: at most one failed attempt per 10 s.
    pub(crate) fn claim_ahead(&self) {
        use std::sync::atomic::Ordering;
        let Some(sh) = self.shared_ctx() else { return };
        let now = crate::lease::now_ms();
        if now.saturating_sub(sh.claim_failed_ms.load(Ordering::Relaxed)) < 10_000 {
            return;
        }
        if self.low_on_space() {
            if !self.claim_more_space() {
                sh.claim_failed_ms.store(now, Ordering::Relaxed);
            }
        } else if self.return_spare_group().is_err() {
            sh.claim_failed_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Returns one group this host claimed but does not use (every block
    /// free) when it holds more than a group and a half of free space, so
    /// other hosts may claim it.
    fn return_spare_group(&self) -> Result<()> {
        let spare = |st: &State| -> Option<usize> {
            let l = st.sb.layout;
            if st.space.free_blocks() < l.ag_blocks as u64 * 3 / 2 {
                return None;
            }
            let per_group = (l.ag_blocks / l.chunk_blocks) as usize;
            let free = st.space.chunk_free_blocks();
            let (mut owned, mut empty) = (0, None);
            for (g, chunks) in free.chunks(per_group).enumerate() {
                // Foreign chunks read as full; an owned, empty group has
                // every chunk entirely free.
                if chunks.iter().any(|&f| f > 0) {
                    owned += 1;
                    if chunks.iter().all(|&f| f == l.chunk_blocks) && chunks.len() == per_group {
                        empty = Some(g);
                    }
                }
            }
            empty.filter(|_| owned > 1)
        };
        if spare(&self.state.lock()).is_none() {
            return Ok(());
        }
        let _g = self.global()?;
        // No write may allocate while the group is handed back.
        let _stripes = self.lock_all_stripes();
        let _ctl = self.commit.lock();
        let mut st = self.state.lock();
        let Some(g) = spare(&st) else {
            return Ok(());
        };
        let layout = st.sb.layout;
        let mut claims = read_claims(self.dev.as_ref(), &layout)?;
        match claims.get_mut(g) {
            Some(c) if c.owner as u32 == self.host_id => {
                c.owner = 0;
                c.generation += 1;
            }
            _ => return Ok(()),
        }
        write_claims(self.dev.as_ref(), &layout, &claims, st.sb.generation + 1)?;
        let per_group = (layout.ag_blocks / layout.chunk_blocks) as u64;
        st.space
            .disown_chunks(g as u64 * per_group..(g as u64 + 1) * per_group);
        self.write_catalog(&mut st)
    }

    /// Fewer than a quarter of a group free in this host's groups.
    pub(crate) fn low_on_space(&self) -> bool {
        let st = self.state.lock();
        let l = st.sb.layout;
        st.space.free_blocks() < (l.ag_blocks as u64 / 4).max(l.chunk_blocks as u64)
    }

    /// Claims a first group if this host has none with free space (at
    /// join, with the global lock held).
    pub(crate) fn ensure_space_locked(&self) -> Result<()> {
        if self.shared.is_some() && self.low_on_space() {
            self.claim_group_locked()?;
        }
        Ok(())
    }
}
