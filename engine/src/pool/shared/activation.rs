//! Volume activation: one writer per volume, taking a volume from a
//! holder proven dead, releasing one for live migration.

use crate::error::{Error, Result};
use crate::format::catalog::flags;
use crate::map::state::State;
use crate::pool::Inner;
use crate::Pool;
use std::time::Duration;

/// How often a waiting `open_volume` reads the holder's slot.
const HOLDER_POLL: Duration = Duration::from_millis(200);

/// How often it says that it is still waiting.
const HOLDER_NOTE: Duration = Duration::from_secs(3);

/// Progress of one `open_volume` waiting for a silent holder.
#[derive(Default)]
pub(crate) struct HolderWait {
    started: Option<std::time::Instant>,
    noted: Option<std::time::Instant>,
}

impl Inner {
    /// Whether this host may write volume `v` without activating it first:
    /// a single-host pool, a read-only image, or an activation it holds.
    pub(crate) fn holds_activation(&self, v: &crate::map::state::Vol) -> bool {
        let Some(sh) = self.shared_ctx() else {
            return true;
        };
        v.rec.flags & (flags::SNAPSHOT | flags::BASE | flags::READ_ONLY) != 0
            || (v.rec.active_host as u32 == self.host_id && v.rec.active_gen == sh.lease.generation)
    }

    /// Refuses to change a volume that another host has active.
    pub(crate) fn check_not_active_elsewhere(&self, st: &State, id: u64) -> Result<()> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(());
        };
        let Some(v) = st.volumes.get(&id) else {
            return Ok(());
        };
        // A snapshot's mapping is its volume's business.
        let owner_vol = if v.rec.flags & flags::SNAPSHOT != 0 {
            st.volumes.get(&v.rec.parent_id).unwrap_or(v)
        } else {
            v
        };
        let (h, g) = (owner_vol.rec.active_host as u32, owner_vol.rec.active_gen);
        if h == 0 || (h == self.host_id && g == sh.lease.generation) {
            return Ok(());
        }
        Err(Error::busy(
            crate::BusyKind::ActiveElsewhere,
            format!(
            "volume '{}' is active on host {h} ('{}'); release it there first (thinctl release)",
            st.display_name(owner_vol),
            sh.lease.name_of(h)
        ),
        ))
    }

    /// Takes the exclusive activation lease of a writable volume.
    pub(crate) fn activate(&self, name: &str) -> Result<u64> {
        let mut st = self.pool_change()?;
        let id = st
            .id_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let Some(sh) = self.shared_ctx() else {
            return Ok(id);
        };
        let v = &st.volumes[&id];
        if v.rec.flags & (flags::SNAPSHOT | flags::BASE | flags::READ_ONLY) != 0 {
            return Ok(id); // read-only images may be opened anywhere
        }
        self.check_not_active_elsewhere(&st, id)?;
        if v.rec.active_host as u32 == self.host_id && v.rec.active_gen == sh.lease.generation {
            return Ok(id);
        }
        let v = st.volumes.get_mut(&id).ok_or(Error::PoolReadOnly)?;
        v.rec.active_host = self.host_id as u16;
        v.rec.active_gen = sh.lease.generation;
        self.write_catalog_or_undo(&mut st, |st| {
            if let Some(v) = st.volumes.get_mut(&id) {
                v.rec.active_host = 0;
                v.rec.active_gen = 0;
            }
        })?;
        Ok(id)
    }

    /// Releases this host's activation of a volume: its changes are folded
    /// into its tree first, so the next host to activate it reads them.
    pub(crate) fn deactivate(&self, id: u64) -> Result<()> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(());
        };
        {
            let st = self.state.lock();
            match st.volumes.get(&id) {
                Some(v)
                    if v.rec.active_host as u32 == self.host_id
                        && v.rec.active_gen == sh.lease.generation
                        && v.handles == 0 => {}
                _ => return Ok(()),
            }
        }
        self.writable()?;
        {
            let mut guard = self.commit.lock();
            let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
            self.commit_locked(ctl)?;
            self.checkpoint_locked(ctl)?;
        }
        let mut st = self.pool_change()?;
        let Some(v) = st.volumes.get_mut(&id) else {
            return Ok(());
        };
        if v.handles != 0 || v.rec.active_host as u32 != self.host_id {
            return Ok(()); // reopened meanwhile
        }
        v.rec.active_host = 0;
        v.rec.active_gen = 0;
        self.write_catalog(&mut st)
    }

    /// At join, after replaying this host's own journal: activations left
    /// by an earlier run of this host id are released.
    pub(crate) fn drop_stale_activations_locked(&self) -> Result<()> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(());
        };
        let _ctl = self.commit.lock();
        let mut st = self.state.lock();
        let mut changed = false;
        for v in st.volumes.values_mut() {
            if v.rec.active_host as u32 == self.host_id && v.rec.active_gen != sh.lease.generation {
                v.rec.active_host = 0;
                v.rec.active_gen = 0;
                changed = true;
            }
        }
        if changed {
            self.write_catalog(&mut st)?;
        }
        Ok(())
    }

    /// After `open_volume` found `name` active on another host: while that
    /// host is silent, waits until it is proven dead (its slot unchanged
    /// for the dead time as this process watched it) or leaves, and returns
    /// whether to try again. `false` (give up, report the holder) when
    /// waiting is off, the holder is seen renewing, the wait has run past
    /// its bound, or the volume is not held by another host at all.
    pub(crate) fn wait_for_holder(&self, name: &str, w: &mut HolderWait) -> Result<bool> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(false);
        };
        if !sh
            .wait_for_holders
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(false);
        }
        let holder = {
            let st = self.state.lock();
            st.id_by_name(name)
                .and_then(|id| st.volumes.get(&id))
                .map(|v| v.rec.active_host as u32)
        };
        let Some(h) = holder.filter(|&h| h != 0 && h != self.host_id) else {
            return Ok(false);
        };
        let started = *w.started.get_or_insert_with(std::time::Instant::now);
        // Bounded: the dead time plus a margin for slow reads of the slots.
        let limit = Duration::from_millis(sh.lease.timing.dead_ms() * 2 + 5_000);
        loop {
            sh.lease.observe()?;
            let Some(watch) = sh.lease.watch_of(h) else {
                return Ok(false);
            };
            if watch.free || watch.dead_in_ms == 0 {
                return Ok(true); // left, or dead: activation recovers it
            }
            let now = std::time::Instant::now();
            // Alive: its slot changed since this wait began. (A change just
            // before it proves nothing: a host killed a moment ago looks the
            // same. So a live holder is refused at its next renewal, within
            // 2 x io_timeout.)
            let waited = now.duration_since(started);
            if watch.changed_while_watched && watch.unchanged_ms < waited.as_millis() as u64 {
                return Ok(false);
            }
            if waited > limit {
                return Ok(false);
            }
            if w.noted.is_none_or(|t| now.duration_since(t) >= HOLDER_NOTE) {
                w.noted = Some(now);
                log::info!(
                    "waiting up to {} s for host {h} ('{}'), silent for {} s",
                    watch.dead_in_ms.div_ceil(1000),
                    sh.lease.name_of(h),
                    watch.watched_ms / 1000
                );
            }
            std::thread::sleep(HOLDER_POLL.min(Duration::from_millis(watch.dead_in_ms)));
        }
    }

    pub(crate) fn set_wait_for_holders(&self, on: bool) {
        if let Some(sh) = self.shared_ctx() {
            sh.wait_for_holders
                .store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Pool {
    /// The host whose activation holds volume `name`, read under the
    /// global lock so that another host's recent activation shows. `None`
    /// when it is free, and on a pool of one host.
    pub fn active_host(&self, name: &str) -> Result<Option<u32>> {
        let _g = self.inner.global()?;
        let st = self.inner.state.lock();
        let id = st
            .id_by_name(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
        let h = st.volumes.get(&id).map_or(0, |v| v.rec.active_host as u32);
        Ok((h != 0).then_some(h))
    }

    /// Whether `open_volume` waits for a volume's silent holder to be
    /// proven dead (the default) or refuses at once naming the holder, as
    /// lvmlockd's OWNER_NOWAIT does. No effect on a single-host pool.
    pub fn set_wait_for_dead_holders(&self, wait: bool) {
        self.inner.set_wait_for_holders(wait);
    }

    /// Releases this host's activation of a volume (for live migration:
    /// release on the source, then open on the target). Refused while the
    /// volume is open here.
    pub fn release_volume(&self, name: &str) -> Result<()> {
        let id = {
            let st = self.inner.state.lock();
            let v = st
                .volume_by_name(name)
                .ok_or_else(|| Error::NoSuchVolume(name.to_string()))?;
            if v.handles > 0 {
                return Err(Error::busy(
                    crate::BusyKind::VolumeOpen,
                    format!(
                        "volume '{name}' is open on this host; close it (stop serving it) first"
                    ),
                ));
            }
            v.rec.id
        };
        self.inner.deactivate(id)
    }
}
