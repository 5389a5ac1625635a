//! Managing a pool's volumes: listing, creating, removing, renaming and
//! resizing them, their mapped ranges, and opening one for I/O. Snapshots,
//! clones and rollback are `snapshot`'s.

use super::{damaged_ranges, Pool, VolumeInfo};
use crate::alloc::space::Cursor;
use crate::dev::write_blocks;
use crate::error::{Error, Result};
use crate::format::catalog::{self, encode_volume_header, VolumeHeader, VolumeRecord};
use crate::format::journal::Entry;
use crate::format::names::is_valid_volume_name;
use crate::format::node::NodeAddr;
use crate::format::{BLOCK_SIZE, MAX_VOLUME_BYTES};
use crate::map::state::{State, Vol};
use crate::util::now_unix;

impl Pool {
    /// Every volume, snapshot and base, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<VolumeInfo> = st.volumes.values().map(|x| info_of(&st, x)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One volume, snapshot or base by name.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.inner.state.lock();
        st.volume_by_name(name)
            .map(|v| info_of(&st, v))
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// Creates a thin volume of `size_bytes` (a multiple of 4 KiB); no
    /// space is allocated until it is written.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, false)
    }

    /// Like [`Pool::create_volume`]; `allow_overcommit` ignores the pool's
    /// overcommit limit.
    pub fn create_volume_with(
        &self,
        name: &str,
        size_bytes: u64,
        allow_overcommit: bool,
    ) -> Result<VolumeInfo> {
        check_size(size_bytes)?;
        if !is_valid_volume_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        if st.id_by_name(name).is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        check_overcommit(&st, size_bytes, allow_overcommit)?;
        let id = st.sb.next_volume_id;
        let [a, b] = st.alloc_header_pair()?;
        let header = VolumeHeader {
            volume_id: id,
            generation: 1,
            root: NodeAddr::NONE,
            depth: 0,
            mapped_blocks: 0,
            extent_count: 0,
            journal_seq: 0,
            journal_host: inner.host_id,
        };
        let rec = VolumeRecord {
            id,
            flags: 0,
            name: name.to_string(),
            size_bytes,
            header_blocks: [a, b],
            parent_id: 0,
            origin_id: 0,
            created_unix: now_unix(),
            active_host: 0,
            active_gen: 0,
        };
        let r = write_blocks(
            inner.dev.as_ref(),
            &[
                (a, encode_volume_header(&header, a)),
                (b, encode_volume_header(&header, b)),
            ],
        )
        .map_err(|e| Error::io("writing volume header", e));
        if let Err(e) = r {
            st.space.release(a, 1);
            st.space.release(b, 1);
            return Err(e);
        }
        st.sb.next_volume_id += 1;
        st.volumes.insert(
            id,
            Vol {
                rec,
                map: crate::map::extmap::ExtentMap::new(),
                header,
                cursor: Cursor::default(),
                handles: 0,
                damage: Vec::new(),
            },
        );
        inner.write_catalog_or_undo(&mut st, |st| {
            st.volumes.remove(&id);
        })?;
        Ok(info_of(&st, &st.volumes[&id]))
    }

    /// Removes a volume or snapshot (`vol@snap`); its space returns to the
    /// pool. A volume with snapshots needs `recursive`; one that clones
    /// depend on cannot be removed until they are removed or flattened.
    pub fn remove_volume(&self, name: &str, recursive: bool) -> Result<()> {
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let id = st
            .id_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let ids = crate::pool::snapshot::check_removable(&st, id, recursive)?;
        for &i in &ids {
            inner.check_not_active_elsewhere(&st, i)?;
            st.refuse_family_damaged(i, "removal of")?;
        }
        let mut removed: Vec<Vol> = ids.iter().filter_map(|id| st.volumes.remove(id)).collect();
        inner.write_catalog_or_undo(&mut st, |st| {
            for v in removed.drain(..) {
                st.volumes.insert(v.rec.id, v);
            }
        })?;
        // The catalog no longer names them and nothing has them open: what
        // only they held is free at once.
        for v in removed {
            let header_blocks = v.rec.header_blocks;
            crate::pool::snapshot::release_map(&mut st, v.map);
            for b in header_blocks {
                st.space.release(b, 1);
            }
        }
        Ok(())
    }

    /// Renames a volume, or a snapshot within its volume (`vol@a` to
    /// `vol@b`, or just `b`).
    pub fn rename_volume(&self, old: &str, new: &str) -> Result<()> {
        let (new_full, new_name) = match old.split_once('@') {
            None => (new.to_string(), new),
            Some((vol, _)) => {
                let snap = match new.split_once('@') {
                    None => new,
                    Some((v, s)) if v == vol => s,
                    Some(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "a snapshot stays with its volume: rename '{old}' to '{vol}@NEW'"
                        )))
                    }
                };
                (format!("{vol}@{snap}"), snap)
            }
        };
        if !is_valid_volume_name(new_name) {
            return Err(Error::InvalidName(new.to_string()));
        }
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let id = st
            .id_by_name(old)
            .ok_or_else(|| Error::NoSuchVolume(old.to_string()))?;
        if old == new_full {
            return Ok(());
        }
        if st.id_by_name(&new_full).is_some() {
            return Err(Error::VolumeExists(new_full));
        }
        let Some(v) = st.volumes.get_mut(&id) else {
            return Err(Error::NoSuchVolume(old.to_string()));
        };
        let old_name = std::mem::replace(&mut v.rec.name, new_name.to_string());
        inner.write_catalog_or_undo(&mut st, |st| {
            if let Some(v) = st.volumes.get_mut(&id) {
                v.rec.name = old_name;
            }
        })
    }

    /// Virtual byte ranges (offset, length) of a volume that hold data, in
    /// order (for exports that skip what was never written).
    pub fn mapped_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let st = self.inner.state.lock();
        let v = st
            .volume_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let bs = BLOCK_SIZE as u64;
        let mut out: Vec<(u64, u64)> = Vec::new();
        v.map.for_each(|e| {
            if e.is_zero() {
                return;
            }
            let (off, len) = (e.vblock * bs, e.len as u64 * bs);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
        });
        // A damaged range counts as mapped, so a reader of "what holds
        // data" reads it and gets the error instead of taking it as zeros.
        if !v.damage.is_empty() {
            for d in damaged_ranges(v) {
                let (b0, b1) = d.bytes();
                if b1 > b0 {
                    out.push((b0, b1 - b0));
                }
            }
            out.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (o, l) in out {
                match merged.last_mut() {
                    Some((mo, ml)) if o <= *mo + *ml => *ml = (*ml).max(o + l - *mo),
                    _ => merged.push((o, l)),
                }
            }
            out = merged;
        }
        Ok(out)
    }

    /// Changes a volume's size. Shrinking drops the data past the new end
    /// and is refused unless `allow_shrink`.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<VolumeInfo> {
        check_size(size_bytes)?;
        self.inner.writable()?;
        let inner = &self.inner;
        let _g = inner.global()?;
        let mut ctl_guard = inner.commit.lock();
        let ctl = ctl_guard.as_mut().ok_or(Error::PoolReadOnly)?;
        let (id, old_size) = {
            let st = inner.state.lock();
            let v = st
                .volume_by_name(name)
                .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
            inner.check_not_active_elsewhere(&st, v.rec.id)?;
            if v.rec.flags & catalog::flags::READ_ONLY != 0 {
                return Err(Error::ReadOnly(name.to_string()));
            }
            st.refuse_damaged(v.rec.id, "resize")?;
            (v.rec.id, v.rec.size_bytes)
        };
        if size_bytes > old_size {
            let st = inner.state.lock();
            check_overcommit(&st, size_bytes - old_size, allow_shrink)?;
        }
        if size_bytes < old_size {
            if !allow_shrink {
                return Err(Error::InvalidArgument(format!(
                    "shrinking '{name}' from {} to {} discards the data past the new end; use --force",
                    crate::util::human_bytes(old_size),
                    crate::util::human_bytes(size_bytes)
                )));
            }
            {
                let mut st = inner.state.lock();
                let st = &mut *st;
                let vol = st
                    .volumes
                    .get_mut(&id)
                    .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
                let from = size_bytes / BLOCK_SIZE as u64;
                let len = old_size / BLOCK_SIZE as u64 - from;
                let mut ch = crate::map::extmap::RefChanges::default();
                vol.map.unmap(from, len, &mut ch);
                vol.rec.size_bytes = size_bytes;
                let mut at = from;
                while at < from + len {
                    let n = (from + len - at).min(u32::MAX as u64);
                    st.queue_entries(&[Entry::Unmap {
                        volume: id,
                        vblock: at,
                        len: n as u32,
                    }]);
                    at += n;
                }
                st.apply_changes(&ch);
            }
            // The unmap is durable before the catalog names the new size.
            inner.commit_locked(ctl)?;
        }
        let mut st = inner.state.lock();
        let vol = st
            .volumes
            .get_mut(&id)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        vol.rec.size_bytes = size_bytes;
        inner.write_catalog_or_undo(&mut st, |st| {
            if size_bytes > old_size {
                if let Some(v) = st.volumes.get_mut(&id) {
                    v.rec.size_bytes = old_size;
                }
            }
        })?;
        Ok(info_of(&st, &st.volumes[&id]))
    }

    /// Opens a volume for I/O.
    ///
    /// On a shared pool a writable volume is activated exclusively for
    /// this host first (as `lvchange -aey`); it is released when its last
    /// handle closes. Snapshots and base images need no activation.
    ///
    /// On a shared pool, a volume held by a host that has stopped renewing
    /// its lease is waited for, as sanlock's acquire waits: once that
    /// host's slot has stayed unchanged for the dead time (counted from
    /// this process's own first read), the host is recovered and the
    /// volume taken. A holder seen renewing meanwhile is refused, at its
    /// next renewal (within 2 x io_timeout). See
    /// [`Pool::set_wait_for_dead_holders`].
    pub fn open_volume(&self, name: &str) -> Result<crate::Volume> {
        let mut wait = crate::pool::shared::HolderWait::default();
        loop {
            match self.open_volume_once(name) {
                Err(e @ Error::Busy { .. }) => {
                    if !self.inner.wait_for_holder(name, &mut wait)? {
                        return Err(e);
                    }
                }
                r => return r,
            }
        }
    }

    /// Opens a volume without waiting: Busy at once while another host
    /// holds it, silent or not (a migration target polls this while the
    /// source releases).
    pub fn try_open_volume(&self, name: &str) -> Result<crate::Volume> {
        self.open_volume_once(name)
    }

    fn open_volume_once(&self, name: &str) -> Result<crate::Volume> {
        // The handle is counted under the same lock that sees the
        // activation, so a release (which needs zero handles) cannot slip
        // in between.
        for _ in 0..3 {
            let mut st = self.inner.state.lock();
            let id = st.id_by_name(name);
            if let Some(v) = id.and_then(|id| st.volumes.get_mut(&id)) {
                if self.inner.holds_activation(v) {
                    v.handles += 1;
                    let id = v.rec.id;
                    return Ok(crate::Volume::new(self.inner.clone(), id, name));
                }
            }
            drop(st);
            if self.inner.shared.is_none() {
                return Err(Error::NoSuchVolume(name.to_string()));
            }
            // Under the global lock, with a view brought up to date (the
            // volume may be another host's creation).
            self.inner.activate(name)?;
        }
        Err(Error::busy(
            crate::BusyKind::Retry,
            format!("volume '{name}' keeps being released while this host activates it; try again"),
        ))
    }
}

/// Sum of the sizes of all volumes but snapshots.
pub(crate) fn provisioned(st: &State) -> u64 {
    st.volumes
        .values()
        .filter(|v| v.rec.flags & catalog::flags::SNAPSHOT == 0)
        .map(|v| v.rec.size_bytes)
        .sum()
}

/// Refuses to provision `extra` more bytes past the pool's overcommit limit.
pub(crate) fn check_overcommit(st: &State, extra: u64, force: bool) -> Result<()> {
    let limit = st.sb.policy.max_overcommit_pct as u128;
    if limit == 0 || force {
        return Ok(());
    }
    let data = st.space.total_blocks() as u128 * BLOCK_SIZE as u128;
    let after = provisioned(st) as u128 + extra as u128;
    if after * 100 > data * limit {
        return Err(Error::InvalidArgument(format!(
            "this would provision {} on {} of data space ({:.2}x), past the pool's overcommit limit of {:.2}x; use --force",
            crate::util::human_bytes(u64::try_from(after).unwrap_or(u64::MAX)),
            crate::util::human_bytes(u64::try_from(data).unwrap_or(u64::MAX)),
            after as f64 / data.max(1) as f64,
            limit as f64 / 100.0
        )));
    }
    Ok(())
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidArgument(
            "volume size must be greater than zero".into(),
        ));
    }
    if !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(Error::InvalidArgument(format!(
            "volume size {size} bytes is not a multiple of 4 KiB"
        )));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "volume size {} exceeds the format's 1 EiB limit",
            crate::util::human_bytes(size)
        )));
    }
    Ok(())
}

pub(crate) fn info_of(st: &State, v: &Vol) -> VolumeInfo {
    let name_of = |id: u64| st.volumes.get(&id).map(|p| st.display_name(p));
    VolumeInfo {
        id: v.rec.id,
        name: st.display_name(v),
        size_bytes: v.rec.size_bytes,
        mapped_bytes: v.map.mapped_blocks() * BLOCK_SIZE as u64,
        extents: v.map.extent_count(),
        read_only: v.rec.flags & catalog::flags::READ_ONLY != 0,
        snapshot: v.rec.flags & catalog::flags::SNAPSHOT != 0,
        base: v.rec.flags & catalog::flags::BASE != 0,
        created_unix: v.rec.created_unix,
        snapshot_of: if v.rec.flags & catalog::flags::SNAPSHOT != 0 {
            name_of(v.rec.parent_id)
        } else {
            None
        },
        clone_of: if v.rec.origin_id != 0 {
            name_of(v.rec.origin_id)
        } else {
            None
        },
        damage: damaged_ranges(v),
    }
}
