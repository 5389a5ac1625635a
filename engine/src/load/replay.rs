//! Journal replay: applying the journal's entries, and the unflushed
//! record's, to a loaded state.

use crate::dev::Blocks;
use crate::format::journal::{decode_block, Entry, HostCheckpoint, JournalBlock};
use crate::format::Layout;
use crate::map::extmap::RefChanges;
use crate::map::state::{Damage, State};
use std::collections::HashSet;

/// Looks past a journal position that ends the replay for a valid block of
/// a commit that began after sequence `seq`; returns its block address.
pub(super) fn later_commit(
    ring: &Blocks,
    ring_start: u64,
    ring_len: u32,
    from: u32,
    seq: u64,
) -> Option<u64> {
    (1..ring_len).find_map(|k| {
        let pos = (from + k) % ring_len;
        let at = ring_start + pos as u64;
        match decode_block(&ring[pos as usize], at) {
            // Only a flushed block proves the blocks before it durable.
            Ok(Some((jb, _)))
                if jb.seq > seq
                    && jb.commit_first > seq
                    && jb.seq - seq < ring_len as u64
                    && jb.boot == 0 =>
            {
                Some(at)
            }
            _ => None,
        }
    })
}

/// A MAP entry's physical blocks must lie in the data area and hold no
/// metadata block.
fn check_target(
    layout: &Layout,
    meta_blocks: &HashSet<u64>,
    volume: &str,
    pblock: u64,
    len: u64,
) -> std::result::Result<(), String> {
    if !layout.is_data_block(pblock)
        || !layout.is_data_block(pblock + len - 1)
        || (pblock..pblock + len).any(|b| meta_blocks.contains(&b))
    {
        return Err(format!(
            "(volume '{volume}') maps blocks {pblock}..{} outside the data area or onto metadata",
            pblock + len
        ));
    }
    Ok(())
}

/// Applies replayed journal entries to a loaded state.
pub(super) struct Replay<'a> {
    pub(super) state: &'a mut State,
    pub(super) layout: &'a Layout,
    pub(super) meta_blocks: &'a HashSet<u64>,
    pub(super) host_id: u32,
    pub(super) ch: RefChanges,
    pub(super) already: Vec<(u64, u64)>,
}

impl Replay<'_> {
    /// Applies `e`, as carried by the journal block of sequence `seq`;
    /// an error says what is wrong with it.
    pub(super) fn entry(&mut self, e: &Entry, seq: u64) -> std::result::Result<(), String> {
        let state = &mut *self.state;
        let layout = self.layout;
        let Some(vol) = state.volumes.get_mut(&e.volume()) else {
            return Ok(()); // volume removed after this entry
        };
        if vol.header.journal_host == self.host_id && vol.header.journal_seq >= seq {
            return Ok(()); // already in the checkpointed tree
        }
        if !vol.damage.is_empty() {
            return self.damaged_entry(e);
        }
        let ch = &mut self.ch;
        ch.clear();
        match *e {
            Entry::Map {
                vblock,
                pblock,
                len,
                ..
            } => {
                let len = len as u64;
                check_target(layout, self.meta_blocks, &vol.rec.name, pblock, len)?;
                vol.map.map(vblock, pblock, len, ch);
                for p in state.drop_refs(ch) {
                    state.space.release(p.0, p.1);
                }
                // The block may already be held by a snapshot taken
                // after this write but before its entry was journaled.
                self.already.clear();
                state.space.mark_or_share(pblock, len, &mut self.already);
                for &(sp, sn) in &self.already {
                    state.refs.add(sp, sn);
                }
            }
            Entry::Unmap { vblock, len, .. } | Entry::Zero { vblock, len, .. } => {
                if matches!(e, Entry::Zero { .. }) {
                    vol.map.zero(vblock, len as u64, ch);
                } else {
                    vol.map.unmap(vblock, len as u64, ch);
                }
                for p in state.drop_refs(ch) {
                    state.space.release(p.0, p.1);
                }
            }
        }
        Ok(())
    }

    /// Applies `e` to a damaged volume. Its tree on disk is never
    /// replaced, so nothing it names may be freed: replaced blocks stay
    /// held, not released. Parts of the range that fall in a damaged
    /// subtree cannot be applied to the map at all; the blocks they map
    /// are held too. The entry is kept to be journaled again by every
    /// checkpoint (`State::carried`).
    fn damaged_entry(&mut self, e: &Entry) -> std::result::Result<(), String> {
        let state = &mut *self.state;
        let layout = self.layout;
        let Some(vol) = state.volumes.get_mut(&e.volume()) else {
            return Ok(());
        };
        let (vblock, len) = match *e {
            Entry::Map {
                vblock,
                pblock,
                len,
                ..
            } => {
                let len = len as u64;
                check_target(layout, self.meta_blocks, &vol.rec.name, pblock, len)?;
                (vblock, len)
            }
            Entry::Unmap { vblock, len, .. } | Entry::Zero { vblock, len, .. } => {
                (vblock, len as u64)
            }
        };
        let mut held: Vec<(u64, u64)> = Vec::new();
        for (at, n, inside) in split_by_damage(&vol.damage, vblock, len) {
            let ch = &mut self.ch;
            ch.clear();
            let pblock = match *e {
                Entry::Map { pblock, .. } => Some(pblock + (at - vblock)),
                _ => None,
            };
            if !inside {
                match (*e, pblock) {
                    (Entry::Map { .. }, Some(p)) => vol.map.map(at, p, n, ch),
                    (Entry::Zero { .. }, _) => vol.map.zero(at, n, ch),
                    _ => vol.map.unmap(at, n, ch),
                }
                for &(p, k) in &ch.added {
                    state.refs.add(p, k);
                }
                held.extend(ch.dropped.iter().copied());
            }
            if let Some(p) = pblock {
                self.already.clear();
                state.space.mark_or_share(p, n, &mut self.already);
                for &(sp, sn) in &self.already {
                    state.refs.add(sp, sn);
                }
                if inside {
                    held.push((p, n));
                }
            }
        }
        state.quarantine.extend(held);
        state.carried.push(*e);
        Ok(())
    }

    /// Applies what the unflushed record holds beyond the replayed journal
    /// `chain` (which ends before sequence `end_seq`), and queues it for
    /// the next commit. Returns how many entries it applied.
    ///
    /// A slot is current only under the host checkpoint it was written
    /// for: another host's recovery of this host's journal writes a later
    /// one, and its record is stale then. Its first entries may already be
    /// in journal blocks from its `start_seq` on, written by a commit that
    /// died before it could start the other slot; applying from an earlier
    /// entry than needed would still be right (replaying a suffix of the
    /// changes in order ends in the same state), applying from a later one
    /// would not.
    pub(super) fn record(
        &mut self,
        found: &crate::unflushed::Found,
        ckpt: &HostCheckpoint,
        chain: &[(u64, JournalBlock, u32)],
        end_seq: u64,
    ) -> usize {
        let k = found.key;
        let current = (k.gen_lo..=k.gen_hi).contains(&ckpt.generation)
            && (ckpt.seq..=end_seq).contains(&k.start_seq);
        if !current {
            log::warn!(
                "host {}: the unflushed record in memory belongs to an earlier checkpoint (generation {}..={}, sequence {}; the journal is at generation {}, sequence {}..{}): it is not replayed",
                self.host_id, k.gen_lo, k.gen_hi, k.start_seq, ckpt.generation, ckpt.seq, end_seq
            );
            return 0;
        }
        let journaled: usize = chain
            .iter()
            .filter(|(_, jb, _)| jb.seq >= k.start_seq)
            .map(|(_, jb, _)| jb.entries.len())
            .sum();
        let rest = found.entries.get(journaled..).unwrap_or(&[]);
        for (i, e) in rest.iter().enumerate() {
            if let Err(what) = self.entry(e, k.start_seq) {
                // Memory this process wrote: a bad entry is a bug, and the
                // entries before it are still a consistent older state.
                log::warn!(
                    "host {}: unflushed record entry {} {what}; replay stops there",
                    self.host_id,
                    journaled + i
                );
                self.state.pending.extend_from_slice(&rest[..i]);
                return i;
            }
        }
        self.state.pending.extend_from_slice(rest);
        rest.len()
    }
}

/// Splits virtual blocks `vblock..vblock+len` at the edges of `damage`
/// (sorted, from `load_tree`): (start, length, inside a damaged range).
fn split_by_damage(damage: &[Damage], vblock: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = vblock + len;
    let mut out = Vec::new();
    let mut pos = vblock;
    while pos < end {
        let inside = damage.iter().find(|d| d.lo <= pos && pos < d.hi);
        let stop = match inside {
            Some(d) => d.hi.min(end),
            None => damage
                .iter()
                .filter(|d| d.lo > pos)
                .map(|d| d.lo)
                .min()
                .unwrap_or(end)
                .min(end),
        };
        out.push((pos, stop - pos, inside.is_some()));
        pos = stop;
    }
    out
}
