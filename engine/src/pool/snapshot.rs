//! Snapshots, base images, linked clones, rollback and flatten.
//!
//! A snapshot or clone is a volume whose mapping shares every leaf with its
//! source: creating one writes only its interior nodes and header, whatever
//! the size of the source (no data and no leaves are copied). Reads cost the
//! same at any depth because every volume has a complete mapping of its own;
//! a write to shared data allocates a new 4 KiB block (copy-on-write).

use crate::alloc::space::Cursor;
use crate::dev::write_blocks;
use crate::error::{Error, Result};
use crate::format::catalog::{encode_volume_header, flags, VolumeHeader, VolumeRecord};
use crate::format::names::is_valid_volume_name;
use crate::format::node::NodeAddr;
use crate::format::BLOCK_SIZE;
use crate::map::extmap::RefChanges;
use crate::map::state::{State, Vol};
use crate::pool::{info_of, plan_tree, Inner, Pool, TreePlan, VolumeInfo};
use crate::util::now_unix;
use parking_lot::MutexGuard;

/// Node blocks encoded and written at a time, as `write_nodes` does.
const NODE_BATCH: usize = 1024;

/// Whether a tree is written for a volume nothing refers to yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fresh {
    Yes,
    No,
}

/// What a volume uses, as `du` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The volume's name.
    pub name: String,
    /// Its virtual size.
    pub provisioned_bytes: u64,
    /// Bytes its mapping points at (exclusive plus shared).
    pub mapped_bytes: u64,
    /// Freed if this volume alone were removed.
    pub exclusive_bytes: u64,
    /// Also held by a snapshot, base or clone.
    pub shared_bytes: u64,
}

impl Pool {
    /// Takes a crash-consistent, read-only snapshot `vol@snap` of `vol`.
    pub fn create_snapshot(&self, spec: &str) -> Result<VolumeInfo> {
        let (vol, snap) = spec.split_once('@').ok_or_else(|| {
            Error::InvalidArgument(format!("'{spec}' is not a snapshot name; use VOL@SNAP"))
        })?;
        if !is_valid_volume_name(snap) {
            return Err(Error::InvalidName(snap.to_string()));
        }
        self.inner.add_sharing_volume(vol, spec, |src, st| {
            if src.rec.flags & flags::SNAPSHOT != 0 {
                return Err(Error::InvalidArgument(format!(
                    "'{vol}' is a snapshot; snapshot its volume instead"
                )));
            }
            if st.id_by_name(spec).is_some() {
                return Err(Error::VolumeExists(spec.to_string()));
            }
            // A snapshot of a damaged tree would lack the unreadable part.
            st.refuse_damaged(src.rec.id, "snapshot")?;
            Ok((
                snap.to_string(),
                flags::SNAPSHOT | flags::READ_ONLY,
                src.rec.id,
                0,
            ))
        })
    }

    /// Makes a writable linked clone `new` of a base image or snapshot.
    pub fn clone_volume(&self, source: &str, new: &str) -> Result<VolumeInfo> {
        if !is_valid_volume_name(new) {
            return Err(Error::InvalidName(new.to_string()));
        }
        self.inner.add_sharing_volume(source, new, |src, st| {
            if src.rec.flags & (flags::SNAPSHOT | flags::BASE) == 0 {
                return Err(Error::InvalidArgument(format!(
                    "'{source}' is a live volume: clone a snapshot of it (VOL@SNAP) or make it a base first"
                )));
            }
            if st.id_by_name(new).is_some() {
                return Err(Error::VolumeExists(new.to_string()));
            }
            st.refuse_damaged(src.rec.id, "clone")?;
            crate::pool::check_overcommit(st, src.rec.size_bytes, false)?;
            Ok((new.to_string(), 0, 0, src.rec.id))
        })
    }

    /// Turns a volume into a read-only base image (template) that clones
    /// can share, optionally renaming it (Proxmox: vm-N-disk-M ->
    /// base-N-disk-M).
    pub fn make_base(&self, name: &str, new_name: Option<&str>) -> Result<VolumeInfo> {
        self.inner.writable()?;
        if let Some(n) = new_name {
            if !is_valid_volume_name(n) {
                return Err(Error::InvalidName(n.to_string()));
            }
        }
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let id = st
            .id_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        inner.check_not_active_elsewhere(&st, id)?;
        let v = &st.volumes[&id];
        if v.rec.flags & flags::SNAPSHOT != 0 {
            return Err(Error::InvalidArgument(format!(
                "'{name}' is a snapshot; clone it instead"
            )));
        }
        if v.handles > 0 {
            return Err(Error::busy(
                crate::BusyKind::VolumeOpen,
                format!("volume '{name}' is open; close it first"),
            ));
        }
        if let Some(n) = new_name {
            if n != name && st.id_by_name(n).is_some() {
                return Err(Error::VolumeExists(n.to_string()));
            }
        }
        let old = v.rec.clone();
        if let Some(v) = st.volumes.get_mut(&id) {
            v.rec.flags |= flags::BASE | flags::READ_ONLY;
            if let Some(n) = new_name {
                v.rec.name = n.to_string();
            }
        }
        inner.write_catalog_or_undo(&mut st, |st| {
            if let Some(v) = st.volumes.get_mut(&id) {
                v.rec = old;
            }
        })?;
        Ok(info_of(&st, &st.volumes[&id]))
    }

    /// Makes the volume the content of its snapshot `vol@snap` again.
    /// Newer snapshots would no longer follow from the volume: they are
    /// removed with `force`, else the rollback is refused.
    pub fn rollback(&self, spec: &str, force: bool) -> Result<()> {
        self.inner.writable()?;
        let inner = &self.inner;
        let global = inner.global()?;
        let newer: Vec<String> = {
            let st = inner.state.lock();
            let snap = st
                .volume_by_name(spec)
                .ok_or_else(|| Error::NoSuchVolume(spec.to_string()))?;
            inner.check_not_active_elsewhere(&st, snap.rec.id)?;
            if snap.rec.flags & flags::SNAPSHOT == 0 {
                return Err(Error::InvalidArgument(format!(
                    "'{spec}' is not a snapshot (use VOL@SNAP)"
                )));
            }
            st.refuse_damaged(snap.rec.id, "rollback")?;
            // The volume's old tree is released: nothing it shares with a
            // damaged relative may be freed.
            st.refuse_family_damaged(snap.rec.parent_id, "rollback of")?;
            let vol = &st.volumes[&snap.rec.parent_id];
            if vol.handles > 0 {
                return Err(Error::busy(
                    crate::BusyKind::VolumeOpen,
                    format!(
                        "volume '{}' is open; stop it before a rollback",
                        vol.rec.name
                    ),
                ));
            }
            if vol.rec.flags & flags::READ_ONLY != 0 {
                return Err(Error::ReadOnly(vol.rec.name.clone()));
            }
            let newer: Vec<&Vol> = st
                .snapshots_of(vol.rec.id)
                .into_iter()
                .filter(|&id| id > snap.rec.id)
                .map(|id| &st.volumes[&id])
                .collect();
            if !newer.is_empty() && !force {
                let names: Vec<String> = newer.iter().map(|v| st.display_name(v)).collect();
                return Err(Error::InvalidArgument(format!(
                    "rolling back to '{spec}' would destroy newer snapshots {}; use --force",
                    names.join(", ")
                )));
            }
            for v in &newer {
                let clones = st.clones_of(v.rec.id);
                if !clones.is_empty() {
                    return Err(clones_error(&st, v, &clones));
                }
            }
            newer.iter().map(|v| st.display_name(v)).collect()
        };
        let _stripes = inner.lock_all_stripes();
        let mut guard = inner.commit.lock();
        let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
        inner.commit_locked(ctl)?;
        let journal_seq = ctl.journal.settled_seq();
        let mut st = inner.state.lock();
        let snap_id = st
            .id_by_name(spec)
            .ok_or_else(|| Error::NoSuchVolume(spec.to_string()))?;
        let vol_id = st.volumes[&snap_id].rec.parent_id;
        let shared = st.volumes[&snap_id].map.share();
        let old = match st.volumes.get_mut(&vol_id) {
            Some(v) => std::mem::replace(&mut v.map, shared),
            None => return Err(Error::NoSuchVolume(spec.to_string())),
        };
        // Journal entries up to now describe the old content: the new
        // header says replay starts after them.
        if let Err(e) = inner.write_tree_now(&mut st, vol_id, journal_seq, Fresh::No) {
            if let Some(v) = st.volumes.get_mut(&vol_id) {
                v.map = old;
            }
            return Err(e);
        }
        release_map(&mut st, old);
        // The volume takes the snapshot's size back too (as zfs rollback).
        let snap_size = st.volumes[&snap_id].rec.size_bytes;
        if st.volumes[&vol_id].rec.size_bytes != snap_size {
            if let Some(v) = st.volumes.get_mut(&vol_id) {
                v.rec.size_bytes = snap_size;
            }
            inner.write_catalog(&mut st)?;
        }
        drop(st);
        drop(guard);
        drop(global);
        for name in newer {
            self.remove_volume(&name, false)?;
        }
        Ok(())
    }

    /// Makes a linked clone independent of its base or snapshot by copying
    /// the data it still shares; `progress(done, total)` in blocks.
    pub fn flatten(&self, name: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.inner.writable()?;
        let id = {
            let st = self.inner.state.lock();
            let v = st
                .volume_by_name(name)
                .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
            if v.rec.origin_id == 0 {
                return Err(Error::InvalidArgument(format!(
                    "'{name}' is not a linked clone"
                )));
            }
            st.refuse_damaged(v.rec.id, "flatten")?;
            v.rec.id
        };
        let vol = self.open_volume(name)?;
        let runs = self.inner.shared_runs(id);
        let total: u64 = runs.iter().map(|r| r.1).sum();
        let mut done = 0;
        let mut buf = vec![0u8; 256 * BLOCK_SIZE];
        progress(0, total);
        for (vblock, len) in runs {
            let mut at = vblock;
            while at < vblock + len {
                let n = (vblock + len - at).min(256);
                let bytes = (n as usize) * BLOCK_SIZE;
                let sector = at * (BLOCK_SIZE as u64 / 512);
                vol.read(sector, &mut buf[..bytes])?;
                // A write to shared data lands in new blocks of its own.
                vol.write(sector, &buf[..bytes])?;
                at += n;
                done += n;
                progress(done, total);
            }
        }
        vol.flush()?;
        drop(vol);
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let old_origin = st.volumes.get(&id).map_or(0, |v| v.rec.origin_id);
        if let Some(v) = st.volumes.get_mut(&id) {
            v.rec.origin_id = 0;
        }
        inner.write_catalog_or_undo(&mut st, |st| {
            if let Some(v) = st.volumes.get_mut(&id) {
                v.rec.origin_id = old_origin;
            }
        })
    }

    /// Provisioned, mapped, exclusive and shared bytes of every volume.
    pub fn usage(&self) -> Vec<Usage> {
        let st = self.inner.state.lock();
        let b = BLOCK_SIZE as u64;
        let mut out: Vec<Usage> = st
            .volumes
            .values()
            .map(|v| {
                let mapped = v.map.mapped_blocks();
                let exclusive = v.map.exclusive_blocks(&st.refs);
                Usage {
                    name: st.display_name(v),
                    provisioned_bytes: v.rec.size_bytes,
                    mapped_bytes: mapped * b,
                    exclusive_bytes: exclusive * b,
                    shared_bytes: (mapped - exclusive.min(mapped)) * b,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Virtual byte ranges (offset, length) whose content differs between
    /// `from` (a snapshot) and `to` (a later snapshot of the same volume, or
    /// the volume itself).
    pub fn diff(&self, from: &str, to: &str) -> Result<Vec<(u64, u64)>> {
        let st = self.inner.state.lock();
        let a = st
            .volume_by_name(from)
            .ok_or_else(|| Error::NoSuchVolume(from.to_string()))?;
        let b = st
            .volume_by_name(to)
            .ok_or_else(|| Error::NoSuchVolume(to.to_string()))?;
        let lineage = |v: &Vol| {
            if v.rec.flags & flags::SNAPSHOT != 0 {
                v.rec.parent_id
            } else {
                v.rec.id
            }
        };
        if a.rec.flags & flags::SNAPSHOT == 0 || lineage(a) != lineage(b) {
            return Err(Error::InvalidArgument(format!(
                "diff needs a snapshot and a later snapshot (or the live volume) of the same volume; got '{from}' and '{to}'"
            )));
        }
        if b.rec.flags & flags::SNAPSHOT != 0 && b.rec.id < a.rec.id {
            return Err(Error::InvalidArgument(format!(
                "'{to}' is older than '{from}'"
            )));
        }
        // What a damaged range held is unknown: no diff can say it is equal.
        st.refuse_damaged(a.rec.id, "diff")?;
        st.refuse_damaged(b.rec.id, "diff")?;
        let mut ranges = Vec::new();
        a.map.diff(&b.map, &mut ranges);
        let bs = BLOCK_SIZE as u64;
        Ok(ranges.into_iter().map(|(v, n)| (v * bs, n * bs)).collect())
    }
}

fn clones_error(st: &State, v: &Vol, clones: &[u64]) -> Error {
    let names: Vec<String> = clones
        .iter()
        .filter_map(|id| st.volumes.get(id))
        .map(|c| st.display_name(c))
        .collect();
    Error::busy(
        crate::BusyKind::HasDependents,
        format!(
            "'{}' has linked clones: {}; remove or flatten them first",
            st.display_name(v),
            names.join(", ")
        ),
    )
}

/// Refuses to remove a volume that clones or snapshots still depend on.
pub(crate) fn check_removable(st: &State, id: u64, recursive: bool) -> Result<Vec<u64>> {
    let v = &st.volumes[&id];
    let snaps = st.snapshots_of(id);
    if !snaps.is_empty() && !recursive {
        let names: Vec<String> = snaps
            .iter()
            .map(|s| st.display_name(&st.volumes[s]))
            .collect();
        return Err(Error::busy(
            crate::BusyKind::HasDependents,
            format!(
                "volume '{}' has snapshots ({}); use --recursive to remove them too",
                v.rec.name,
                names.join(", ")
            ),
        ));
    }
    let mut ids = snaps;
    ids.push(id);
    for &x in &ids {
        let clones = st.clones_of(x);
        if !clones.is_empty() {
            return Err(clones_error(st, &st.volumes[&x], &clones));
        }
        if st.volumes[&x].handles > 0 {
            return Err(Error::busy(
                crate::BusyKind::VolumeOpen,
                format!(
                    "volume '{}' is open; close it before removing it",
                    st.display_name(&st.volumes[&x])
                ),
            ));
        }
    }
    Ok(ids)
}

/// Gives up a mapping that nothing on disk points to any more: what only it
/// held is free at once.
pub(crate) fn release_map(st: &mut State, map: crate::map::extmap::ExtentMap) {
    let (data, nodes) = map.release_all();
    let ch = RefChanges {
        added: Vec::new(),
        dropped: data,
    };
    for (p, n) in st.drop_refs(&ch) {
        st.space.release(p, n);
    }
    for b in nodes {
        st.space.release(b, 1);
    }
}

impl Inner {
    /// Adds a volume sharing all of `source`'s mapping. `admit` checks the
    /// source and returns (name, flags, parent id, origin id).
    fn add_sharing_volume(
        &self,
        source: &str,
        display: &str,
        admit: impl FnOnce(&Vol, &State) -> Result<(String, u32, u64, u64)>,
    ) -> Result<VolumeInfo> {
        self.writable()?;
        let _g = self.global()?;
        // Writes in flight could still land in blocks the new volume is
        // about to share: wait for them and hold new ones off.
        let _stripes = self.lock_all_stripes();
        let mut guard = self.commit.lock();
        let ctl = guard.as_mut().ok_or(crate::Error::PoolReadOnly)?;
        let journal_seq = ctl.journal.settled_seq();
        let mut st = self.state.lock();
        let src_id = st
            .id_by_name(source)
            .ok_or_else(|| Error::NoSuchVolume(source.to_string()))?;
        let (name, vflags, parent_id, origin_id) = admit(&st.volumes[&src_id], &st)?;
        if vflags & flags::SNAPSHOT != 0 {
            // Only the host writing a volume knows its current mapping.
            self.check_not_active_elsewhere(&st, src_id)?;
        }
        let id = st.sb.next_volume_id;
        let [a, b] = st.alloc_header_pair()?;
        let src = &st.volumes[&src_id];
        let vol = Vol {
            rec: VolumeRecord {
                id,
                flags: vflags,
                name,
                size_bytes: src.rec.size_bytes,
                header_blocks: [a, b],
                parent_id,
                origin_id,
                created_unix: now_unix(),
                active_host: 0,
                active_gen: 0,
            },
            map: src.map.share(),
            header: VolumeHeader {
                volume_id: id,
                generation: 0,
                root: NodeAddr::NONE,
                depth: 0,
                mapped_blocks: 0,
                extent_count: 0,
                journal_seq,
                journal_host: self.host_id,
            },
            cursor: Cursor::default(),
            handles: 0,
            damage: Vec::new(),
        };
        st.sb.next_volume_id += 1;
        st.volumes.insert(id, vol);
        // Writes the tree and headers with the catalog that names the
        // volume, and commits the superblock.
        if let Err(e) = self.write_tree_now(&mut st, id, journal_seq, Fresh::Yes) {
            if let Some(v) = st.volumes.remove(&id) {
                release_map(&mut st, v.map);
                st.space.release(a, 1);
                st.space.release(b, 1);
            }
            return Err(e);
        }
        let info = info_of(&st, &st.volumes[&id]);
        debug_assert_eq!(info.name, display);
        Ok(info)
    }

    /// Writes volume `id`'s tree and both header copies at once (outside a
    /// checkpoint), then records the new tree as current. A `Fresh` volume
    /// is one the catalog does not list yet: its blocks go out with the
    /// catalog update that adds it ([`Inner::write_catalog_with`]).
    pub(crate) fn write_tree_now(
        &self,
        st: &mut MutexGuard<'_, State>,
        id: u64,
        journal_seq: u64,
        fresh: Fresh,
    ) -> Result<()> {
        let mut node_writes = Vec::new();
        let plan: TreePlan = plan_tree(st, id, journal_seq, &mut node_writes)?;
        let dev = self.dev.as_ref();
        let io = |what: &'static str| move |e| Error::io(what, e);
        let headers: Vec<(u64, Vec<u8>)> = st.volumes[&id]
            .rec
            .header_blocks
            .iter()
            .map(|&at| (at, encode_volume_header(&plan.header, at)))
            .collect();
        let r = match fresh {
            Fresh::Yes => {
                // Nothing refers to these blocks until the new superblock
                // does, so they share the catalog's write and flush: one
                // round trip to the device instead of three. Only a huge
                // tree (source leaves not on disk yet) sends batches ahead.
                let split = node_writes.len().saturating_sub(NODE_BATCH);
                crate::pool::write_nodes(dev, &node_writes[..split]).and_then(|()| {
                    let mut blocks: Vec<(u64, Vec<u8>)> = node_writes[split..]
                        .iter()
                        .flat_map(|w| w.encode())
                        .collect();
                    blocks.extend(headers);
                    self.write_catalog_with(st, blocks)
                })
            }
            Fresh::No => (|| {
                crate::pool::write_nodes(dev, &node_writes)?;
                // The tree, then one header copy at a time: a torn write
                // leaves the other copy (old or new tree) intact.
                dev.flush().map_err(io("flushing mapping nodes"))?;
                for h in &headers {
                    write_blocks(dev, std::slice::from_ref(h))
                        .map_err(io("writing volume header"))?;
                    dev.flush().map_err(io("flushing volume header"))?;
                }
                Ok(())
            })(),
        };
        if let Err(e) = r {
            if fresh == Fresh::Yes {
                // The caller drops the volume: the blocks planned for its
                // tree are garbage.
                for b in plan.new_blocks() {
                    st.space.release(b, 1);
                }
            } else if let Some(v) = st.volumes.get_mut(&id) {
                v.map.set_dirty();
            }
            return Err(e);
        }
        for &b in &plan.unused {
            st.space.release(b, 1);
        }
        if let Some(v) = st.volumes.get_mut(&id) {
            v.map.checkpoint_finish(&plan.written, plan.interior);
            v.header = plan.header;
        }
        Ok(())
    }

    /// Virtual runs of volume `id` whose blocks it shares with another
    /// volume.
    fn shared_runs(&self, id: u64) -> Vec<(u64, u64)> {
        let st = self.state.lock();
        let Some(v) = st.volumes.get(&id) else {
            return Vec::new();
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut runs = Vec::new();
        let mut push = |v: u64, n: u64| match out.last_mut() {
            Some((s, l)) if *s + *l == v => *l += n,
            _ => out.push((v, n)),
        };
        for (_, leaf) in v.map.leaf_refs() {
            let leaf_shared = std::sync::Arc::strong_count(leaf) > 1;
            for e in leaf.extents() {
                if e.is_zero() {
                    continue;
                }
                if leaf_shared {
                    push(e.vblock, e.len as u64);
                    continue;
                }
                runs.clear();
                st.refs.runs(e.pblock, e.len as u64, &mut runs);
                for &(p, n, shared) in &runs {
                    if shared {
                        push(e.vblock + (p - e.pblock), n);
                    }
                }
            }
        }
        out
    }

    /// Holds every stripe lock: no write is in flight or can start.
    pub(crate) fn lock_all_stripes(&self) -> Vec<MutexGuard<'_, ()>> {
        self.stripes.iter().map(|s| s.lock()).collect()
    }
}
