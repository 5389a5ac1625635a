//! How metadata becomes durable. Mapping changes of completed writes are
//! journaled by group commit ([`Inner::flush`]) or, without a flush, by
//! [`Inner::persist`]; a checkpoint folds them into the volume trees,
//! written copy-on-write ([`plan_tree`], [`write_nodes`]); catalog
//! changes are written with both superblock copies
//! ([`Inner::write_catalog`]). A background thread commits every second
//! and checkpoints a half-full journal; [`Inner::shutdown`] stops it and
//! leaves a clean pool.
//!
//! Lock order (as everywhere in the pool): `commit` before `state`.

use super::{Inner, Pool};
use crate::dev::{write_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::catalog::{
    encode_catalog, encode_volume_header, CatalogBlock, VolumeHeader, VolumeRecord,
    RECORDS_PER_BLOCK,
};
use crate::format::journal::{encode_host_checkpoint, HostCheckpoint};
use crate::format::node::{self, Child, Node, NodeAddr};
use crate::format::{SUPERBLOCK_A, SUPERBLOCK_B};
use crate::journal::JournalWriter;
use crate::load::BadCopy;
use crate::map::extmap::{LeafExtents, WrittenLeaf};
use crate::map::state::State;
use crate::unflushed::RecordKey;
use crate::util::now_unix;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the background thread commits and considers a checkpoint
/// (as dm-thin commits every second).
const BACKGROUND_PERIOD: Duration = Duration::from_secs(1);

pub(crate) struct CommitCtl {
    pub journal: JournalWriter,
    pub host_ckpt: HostCheckpoint,
}

#[derive(Default)]
pub(super) struct BackgroundCtl {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Pool {
    pub(crate) fn start_background(&self) -> Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let ctl = self.inner.bg.clone();
        let t = std::thread::Builder::new()
            .name("thinlun-commit".into())
            .spawn(move || background(weak, ctl))
            .map_err(|e| Error::io("starting the background committer", e))?;
        *self.inner.bg_thread.lock() = Some(t);
        Ok(())
    }
}

/// The background committer. It holds the pool only while working, never
/// while waiting, so dropping the last handle closes the pool at once.
fn background(weak: Weak<Inner>, ctl: Arc<BackgroundCtl>) {
    loop {
        {
            let mut stop = ctl.stop.lock();
            if !*stop {
                ctl.wake.wait_for(&mut stop, BACKGROUND_PERIOD);
            }
            if *stop {
                return;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.failed.lock().is_some() {
            continue;
        }
        // Periodic commit bounds what a power loss can take (about 1 s of
        // writes), and a half-full journal is checkpointed early so commits
        // never wait for one.
        let has_pending = !inner.state.lock().pending.is_empty();
        if has_pending {
            let _ = inner.flush();
        }
        // A shared pool's host claims its next group before it runs out,
        // so writes rarely wait for the global lock.
        inner.claim_ahead();
        let mut guard = inner.commit.lock();
        if let Some(ctl) = guard.as_mut() {
            if ctl.journal.used_blocks() > ctl.journal.capacity() / 2 {
                let r = inner
                    .commit_locked(ctl)
                    .and_then(|_| inner.checkpoint_locked(ctl));
                if let Err(e) = r {
                    inner.fail(&e);
                }
            }
        }
    }
}

/// A node to write at `at` (one block, or two for a ditto node); encoded
/// (checksummed) outside the metadata lock so a checkpoint stalls the data
/// path as little as possible.
pub(crate) struct NodeWrite {
    pub at: NodeAddr,
    pub node: NodeBody,
    pub volume: u64,
    pub generation: u64,
}

/// What a planned node holds: a leaf's extents are unpacked only when
/// encoded, outside the state lock.
pub(crate) enum NodeBody {
    Leaf(LeafExtents),
    Built(Node),
}

impl NodeWrite {
    pub(crate) fn encode(&self) -> Vec<(u64, Vec<u8>)> {
        let node = match &self.node {
            NodeBody::Leaf(l) => &Node::Leaf(l.unpack()),
            NodeBody::Built(n) => n,
        };
        node::encode_copies(node, self.volume, self.generation, self.at)
    }
}

/// Encodes and writes nodes (every copy) in batches.
pub(crate) fn write_nodes(dev: &dyn BlockDevice, nodes: &[NodeWrite]) -> Result<()> {
    for batch in nodes.chunks(1024) {
        let blocks: Vec<(u64, Vec<u8>)> = batch.iter().flat_map(|w| w.encode()).collect();
        write_blocks(dev, &blocks).map_err(|e| Error::io("writing mapping nodes", e))?;
    }
    Ok(())
}

/// A volume's tree as a checkpoint writes it: the nodes it writes, and the
/// header that makes them current once durable.
pub(crate) struct TreePlan {
    pub id: u64,
    pub written: Vec<WrittenLeaf>,
    /// Interior node blocks, both copies of each.
    pub interior: Vec<u64>,
    pub header: VolumeHeader,
    /// Node blocks the new tree no longer uses (free once it is durable).
    pub unused: Vec<u64>,
}

impl TreePlan {
    /// Every block the plan's new nodes occupy.
    pub(crate) fn new_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        let leaves = self.written.iter().flat_map(|w| w.at.blocks());
        leaves.chain(self.interior.iter().copied())
    }
}

/// Plans a copy-on-write write of volume `id`'s tree: new blocks for the
/// leaves changed since its last checkpoint and for all interior nodes,
/// encoded into `node_writes`.
pub(crate) fn plan_tree(
    st: &mut State,
    id: u64,
    journal_seq: u64,
    node_writes: &mut Vec<NodeWrite>,
) -> Result<TreePlan> {
    let vol = st
        .volumes
        .get_mut(&id)
        .ok_or_else(|| Error::NoSuchVolume(format!("id {id}")))?;
    let (leaves, unused) = vol.map.checkpoint_begin();
    let (mapped, extents, old_header) =
        (vol.map.mapped_blocks(), vol.map.extent_count(), vol.header);
    let mut written = Vec::new();
    let mut children = Vec::with_capacity(leaves.len());
    for leaf in leaves {
        let Some(extents) = leaf.extents.filter(|_| leaf.disk.is_none()) else {
            children.push(Child {
                key: leaf.key,
                at: leaf.disk,
            });
            continue;
        };
        let at = st.alloc_node().ok_or(Error::NoSpace)?;
        node_writes.push(NodeWrite {
            at,
            node: NodeBody::Leaf(extents),
            volume: id,
            generation: journal_seq,
        });
        written.push(WrittenLeaf {
            key: leaf.key,
            version: leaf.version,
            at,
        });
        children.push(Child { key: leaf.key, at });
    }
    let mut interior = Vec::new();
    let ditto = st.sb.ditto_nodes;
    let (root, depth) = node::build_interior(
        children,
        ditto,
        || st.alloc_node().ok_or(Error::NoSpace),
        |at, n| {
            interior.extend(at.blocks());
            node_writes.push(NodeWrite {
                at,
                node: NodeBody::Built(n),
                volume: id,
                generation: journal_seq,
            });
        },
    )?;
    let header = VolumeHeader {
        generation: old_header.generation + 1,
        root,
        depth,
        mapped_blocks: mapped,
        extent_count: extents,
        journal_seq,
        ..old_header
    };
    Ok(TreePlan {
        id,
        written,
        interior,
        header,
        unused,
    })
}

impl Inner {
    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::PoolReadOnly);
        }
        if let Some(why) = self.failed.lock().as_ref() {
            return Err(Error::busy(
                crate::BusyKind::Stopped,
                format!("pool stopped accepting writes after an earlier error ({why}); reopen it"),
            ));
        }
        Ok(())
    }

    fn fail(&self, e: &Error) {
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }

    pub(crate) fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.writable()?;
        let arrival = self.commits_begun.load(Ordering::SeqCst);
        let mut guard = self.commit.lock();
        // A commit that began after we arrived has completed: it flushed
        // everything we were asked to cover.
        if self.commits_done.load(Ordering::SeqCst) > arrival {
            return Ok(());
        }
        let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
        let n = self.commits_begun.fetch_add(1, Ordering::SeqCst) + 1;
        let r = self.commit_locked(ctl);
        match &r {
            Ok(()) => self.commits_done.store(n, Ordering::SeqCst),
            Err(e) => self.fail(e),
        }
        r
    }

    /// Makes the mapping changes of completed writes survive a crash of
    /// this process (not a power loss, which still needs [`Inner::flush`]).
    /// With an unflushed record they already do: nothing is written. Without
    /// one, their journal blocks are written, with no flush at all. A process
    /// crash loses no completed write, but a power loss can keep a journal
    /// block and lose the data it points to, so such blocks carry this
    /// boot's identity and are replayed only on the same boot or once a
    /// flushed commit follows them (docs/FORMAT.md, 6.6). When the boot
    /// cannot be identified, the data is flushed first instead. Costs
    /// nothing when no mapping changed (overwrites in place).
    pub(crate) fn persist(&self) -> Result<()> {
        {
            let st = self.state.lock();
            if st.unflushed.is_some() {
                // The changes went to the unflushed record as they were
                // made; a record that ran out of room needs a commit.
                let recorded = st.all_recorded();
                drop(st);
                self.writable()?;
                return if recorded { Ok(()) } else { self.flush() };
            }
            if st.pending.is_empty() && self.takes_written.load(Ordering::Acquire) >= st.takes {
                return Ok(());
            }
        }
        let mut guard = self.commit.lock();
        // Whoever took entries before us wrote them under this lock, or
        // failed the pool doing so.
        self.writable()?;
        let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
        let (entries, take) = self.state.lock().take_pending();
        if entries.is_empty() {
            self.takes_written.fetch_max(take, Ordering::Release);
            return Ok(());
        }
        let r = (|| {
            if !ctl.journal.has_room(entries.len()) {
                // Rare: fold everything into the trees instead.
                self.state
                    .lock()
                    .pending
                    .splice(0..0, entries.iter().copied());
                return self.commit_locked(ctl);
            }
            let dev = self.dev.as_ref();
            if self.boot == 0 {
                dev.flush().map_err(|e| Error::io("flushing data", e))?;
            }
            // The batch number is not advanced: frees of these changes
            // become reusable with the next real commit, whose first flush
            // makes these journal blocks durable.
            ctl.journal.append(dev, &entries, self.boot)?;
            self.takes_written.fetch_max(take, Ordering::Release);
            Ok(())
        })();
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    /// Group commit: data flush, then the journal blocks of every pending
    /// change, then a second flush. Frees become reusable afterwards.
    pub(crate) fn commit_locked(&self, ctl: &mut CommitCtl) -> Result<()> {
        let (entries, take, batch) = {
            let mut st = self.state.lock();
            let b = st.batch;
            st.batch += 1;
            let (entries, take) = st.take_pending();
            (entries, take, b)
        };
        let dev = self.dev.as_ref();
        dev.flush().map_err(|e| Error::io("flushing data", e))?;
        // Unflushed persists since the last commit are replayed after a
        // power loss only if a flushed block follows them: write one even
        // with nothing to add.
        if !entries.is_empty() || ctl.journal.unsealed() {
            if ctl.journal.has_room(entries.len().max(1)) {
                ctl.journal.append(dev, &entries, 0)?;
                dev.flush().map_err(|e| Error::io("flushing journal", e))?;
            } else {
                // The trees about to be written already hold these changes.
                self.checkpoint_locked(ctl)?;
            }
        }
        self.takes_written.fetch_max(take, Ordering::Release);
        let mut st = self.state.lock();
        st.committed = st.committed.max(batch);
        st.reclaim();
        if !entries.is_empty() {
            // The journal holds them now: the record keeps only what came
            // after them.
            let key = RecordKey::at(ctl.journal.next_seq(), ctl.host_ckpt.generation);
            st.restart_unflushed(key);
        }
        Ok(())
    }

    /// Writes every changed tree copy-on-write, then the volume headers,
    /// then the host checkpoint that moves the journal's replay start.
    pub(crate) fn checkpoint_locked(&self, ctl: &mut CommitCtl) -> Result<()> {
        self.checkpoint_with(ctl, false)
    }

    /// A checkpoint that writes the headers and host checkpoint even when
    /// nothing changed.
    fn checkpoint_forced(&self, ctl: &mut CommitCtl) -> Result<()> {
        self.checkpoint_with(ctl, true)
    }

    fn checkpoint_with(&self, ctl: &mut CommitCtl, force: bool) -> Result<()> {
        let r = self.checkpoint_inner(ctl, force);
        if let Err(e) = &r {
            self.fail(e);
            for v in self.state.lock().volumes.values_mut() {
                v.map.set_dirty();
            }
        }
        r
    }

    fn checkpoint_inner(&self, ctl: &mut CommitCtl, force: bool) -> Result<()> {
        let journal_seq = ctl.journal.settled_seq();
        let mut plans = Vec::new();
        let mut node_writes: Vec<NodeWrite> = Vec::new();
        {
            let st = self.state.lock();
            // A damaged volume's tree is never rewritten: the new tree would
            // lack the subtree that could not be read, and free its node.
            if !force
                && ctl.journal.used_blocks() == 0
                && st
                    .volumes
                    .values()
                    .all(|v| !v.map.is_dirty() || !v.damage.is_empty())
            {
                return Ok(());
            }
        }
        {
            let mut st = self.state.lock();
            let ids: Vec<u64> = st
                .volumes
                .iter()
                .filter(|(_, v)| v.map.is_dirty() && v.damage.is_empty())
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                plans.push(plan_tree(&mut st, id, journal_seq, &mut node_writes)?);
            }
        }
        let dev = self.dev.as_ref();
        let io = |what: &'static str| move |e| Error::io(what, e);
        if !node_writes.is_empty() {
            write_nodes(dev, &node_writes)?;
            dev.flush().map_err(io("flushing mapping nodes"))?;
        }
        let headers_for = |copy: usize| -> Vec<(u64, Vec<u8>)> {
            let st = self.state.lock();
            plans
                .iter()
                .filter_map(|p| st.volumes.get(&p.id).map(|v| v.rec.header_blocks[copy]))
                .zip(&plans)
                .map(|(at, p)| (at, encode_volume_header(&p.header, at)))
                .collect()
        };
        let new_ckpt = ctl.journal.checkpoint_at_tail(ctl.host_ckpt.generation + 1);
        // Entries of damaged volumes, whose trees are not written, go to the
        // journal again right after the new replay start (made durable by
        // the flush below, before any host checkpoint names that start).
        let carried = self.state.lock().carried.clone();
        if !carried.is_empty() {
            if !ctl.journal.has_room(carried.len()) {
                return Err(Error::busy(crate::BusyKind::Damaged, format!(
                    "the journal has no room for the {} mapping changes of damaged volumes it must keep; repair the pool",
                    carried.len()
                )));
            }
            ctl.journal.append(dev, &carried, 0)?;
        }
        let record_start = ctl.journal.next_seq();
        let region = self.state.lock().sb.layout.host_region(self.host_id);
        let host_copy = |k: u64| (region + k, encode_host_checkpoint(&new_ckpt, region + k));
        write_blocks(dev, &headers_for(0)).map_err(io("writing volume headers"))?;
        dev.flush().map_err(io("flushing volume headers"))?;
        // From the first host checkpoint write on, a crash leaves either
        // generation durable: the unflushed record must hold under both.
        self.state.lock().restart_unflushed(RecordKey {
            start_seq: record_start,
            gen_lo: ctl.host_ckpt.generation,
            gen_hi: new_ckpt.generation,
        });
        let mut second = headers_for(1);
        second.push(host_copy(0));
        write_blocks(dev, &second).map_err(io("writing volume headers"))?;
        dev.flush().map_err(io("flushing volume headers"))?;
        write_blocks(dev, &[host_copy(1)]).map_err(io("writing host checkpoint"))?;
        dev.flush().map_err(io("flushing host checkpoint"))?;
        self.state
            .lock()
            .restart_unflushed(RecordKey::at(record_start, new_ckpt.generation));
        ctl.journal.advance_head_to(&new_ckpt);
        ctl.host_ckpt = new_ckpt;
        let mut st = self.state.lock();
        for p in plans {
            for &b in &p.unused {
                st.space.release(b, 1);
            }
            if let Some(v) = st.volumes.get_mut(&p.id) {
                v.map.checkpoint_finish(&p.written, p.interior);
                v.header = p.header;
            } else {
                // Removed meanwhile: its new nodes are garbage too.
                for b in p.new_blocks() {
                    st.space.release(b, 1);
                }
            }
        }
        Ok(())
    }

    /// Writes the catalog copy-on-write and both superblock copies. Called
    /// with the commit lock held (no checkpoint runs meanwhile), as a
    /// [`Inner::pool_change`] holds it.
    pub(crate) fn write_catalog(&self, st: &mut State) -> Result<()> {
        self.write_catalog_with(st, Vec::new())
    }

    /// [`Inner::write_catalog`], with `extra` blocks that nothing refers to
    /// until the new superblock does (a new volume's tree and headers)
    /// written in the same batch as the catalog and covered by its flush.
    pub(crate) fn write_catalog_with(
        &self,
        st: &mut State,
        extra: Vec<(u64, Vec<u8>)>,
    ) -> Result<()> {
        let r = self.write_catalog_inner(st, extra);
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    fn write_catalog_inner(&self, st: &mut State, extra: Vec<(u64, Vec<u8>)>) -> Result<()> {
        let records: Vec<VolumeRecord> = st.volumes.values().map(|v| v.rec.clone()).collect();
        let nblocks = records.len().div_ceil(RECORDS_PER_BLOCK);
        let mut blocks = Vec::with_capacity(nblocks);
        for _ in 0..nblocks {
            match st.alloc_meta() {
                Some(b) => blocks.push(b),
                None => {
                    for &b in &blocks {
                        st.space.release(b, 1);
                    }
                    return Err(Error::NoSpace);
                }
            }
        }
        let generation = st.sb.generation + 1;
        let mut writes = extra;
        writes.extend(
            records
                .chunks(RECORDS_PER_BLOCK)
                .enumerate()
                .map(|(i, recs)| {
                    let cb = CatalogBlock {
                        records: recs.to_vec(),
                        next: blocks.get(i + 1).copied().unwrap_or(0),
                    };
                    (blocks[i], encode_catalog(&cb, generation, blocks[i]))
                }),
        );
        let dev = self.dev.as_ref();
        let io = |e| Error::io("writing catalog", e);
        write_blocks(dev, &writes).map_err(io)?;
        // Makes the catalog durable, and with it copy B of the previous
        // update, which was written without a flush of its own (6.2): from
        // here on B holds the current generation durably, so A may be
        // overwritten.
        dev.flush().map_err(io)?;
        st.twin_unflushed = false;
        let mut sb = st.sb.clone();
        sb.generation = generation;
        sb.catalog_root = blocks.first().copied().unwrap_or(0);
        sb.commit_unix = now_unix();
        write_blocks(dev, &[(SUPERBLOCK_A, sb.encode(SUPERBLOCK_A))]).map_err(io)?;
        // The commit point: once A is durable the loader picks it (the
        // highest generation) whatever becomes of B.
        dev.flush().map_err(io)?;
        // B needs no flush of its own: A stays durable and untouched until
        // the next update has flushed B (above).
        write_blocks(dev, &[(SUPERBLOCK_B, sb.encode(SUPERBLOCK_B))]).map_err(io)?;
        st.twin_unflushed = true;
        if self.shared.is_some() {
            // The next update may come from another host, which must find
            // B durable before it overwrites A.
            dev.flush().map_err(io)?;
            st.twin_unflushed = false;
        }
        st.sb = sb;
        for b in std::mem::replace(&mut st.catalog_blocks, blocks) {
            st.space.release(b, 1);
        }
        Ok(())
    }

    /// Opening found a damaged or stale copy of a two-copy record (read
    /// from its twin): write every such record again, both copies. Bad
    /// copies of ditto nodes are rewritten in place from their twins: the
    /// blocks belong to this pool's trees, which nothing else writes (not
    /// done on a shared pool, where another host may own the tree).
    pub(super) fn rewrite_redundant_copies(&self, bad_nodes: &[BadCopy]) -> Result<()> {
        let mut guard = self.commit.lock();
        let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
        if self.shared.is_none() && !bad_nodes.is_empty() {
            let dev = self.dev.as_ref();
            let copies = bad_nodes
                .iter()
                .map(|c| c.rewrite_from_twin(dev))
                .collect::<Result<Vec<_>>>()?;
            write_blocks(dev, &copies).map_err(|e| Error::io("rewriting mapping nodes", e))?;
            dev.flush()
                .map_err(|e| Error::io("rewriting mapping nodes", e))?;
            log::info!(
                "{}: {} damaged mapping node copies rewritten from their twins",
                self.label,
                copies.len()
            );
        }
        {
            let mut st = self.state.lock();
            self.write_catalog(&mut st)?;
            for v in st.volumes.values_mut() {
                v.map.set_dirty();
            }
        }
        self.commit_locked(ctl)?;
        self.checkpoint_forced(ctl)
    }

    pub(crate) fn stop_background(&self) {
        *self.bg.stop.lock() = true;
        self.bg.wake.notify_all();
        if let Some(t) = self.bg_thread.lock().take() {
            let _ = t.join();
        }
    }

    pub(super) fn shutdown(&self) -> Result<()> {
        {
            let mut stop = self.bg.stop.lock();
            if *stop {
                return Ok(()); // already closed
            }
            *stop = true;
        }
        self.bg.wake.notify_all();
        if let Some(t) = self.bg_thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        if self.read_only {
            return Ok(());
        }
        // A pool that failed earlier (possibly in the background) must not
        // report a clean close: writes since its last commit may be lost.
        self.writable()?;
        {
            let mut guard = self.commit.lock();
            let Some(ctl) = guard.as_mut() else {
                return Ok(());
            };
            self.commit_locked(ctl)?;
            self.checkpoint_locked(ctl)?;
        }
        // Clean: the LUN holds everything; a record left would only be
        // found stale.
        if let Some(r) = self.state.lock().unflushed.take() {
            r.release();
        }
        self.leave()
    }
}
