//! A pool shared by several hosts (docs/LOCKING.md): the global lock around
//! pool-wide changes, reloading what other hosts changed, volume
//! activation leases, allocation-group claims and dead-host recovery.
//!
//! Rules that make it safe:
//! - catalog, superblock and claim table are written only under the global
//!   lock, and every such change bumps the superblock generation, which is
//!   how other hosts notice they must reload;
//! - a host allocates only inside allocation groups it claimed, so a stale
//!   view of other hosts' volumes can only make it leave space unused,
//!   never hand out a block someone uses;
//! - a volume's mapping is changed only by the host that has it active.

use crate::dev::read_blocks;
use crate::dev::{read_block, write_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::claims::{self, Claim, CLAIMS_PER_BLOCK};
use crate::format::lease::{HostSlot, SlotState};
use crate::format::superblock::{SharedParams, Superblock};
use crate::format::{catalog::flags, Layout, SUPERBLOCK_A, SUPERBLOCK_B};
use crate::lease::{FencedDevice, GlobalGuard, HostLease, JoinOptions, Timing};
use crate::load::load;
use crate::map::state::State;
use crate::pool::{HostOptions, Inner};
use crate::Pool;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a pool-wide change waits for the global lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) struct SharedCtx {
    pub lease: Arc<HostLease>,
    /// Free blocks per allocation group as of the last reload, counted
    /// before this host's view was narrowed to its own groups.
    group_free: Mutex<Vec<u64>>,
    /// When a background claim last found no group to take (boot-time ms),
    /// so a full pool is not asked again every second.
    claim_failed_ms: std::sync::atomic::AtomicU64,
    /// Whether `open_volume` waits for a silent holder to be proven dead.
    wait_for_holders: std::sync::atomic::AtomicBool,
}

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

impl SharedCtx {
    pub fn new(lease: Arc<HostLease>) -> SharedCtx {
        SharedCtx {
            lease,
            group_free: Mutex::new(Vec::new()),
            claim_failed_ms: std::sync::atomic::AtomicU64::new(0),
            wait_for_holders: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn set_group_free(&self, g: Vec<u64>) {
        *self.group_free.lock() = g;
    }
}

/// Joins a shared pool as `host` and opens it: take the host slot, then,
/// under the global lock, load the pool, fold this host's own journal
/// (left by an earlier run) into its trees, drop that run's activations,
/// and claim a first allocation group.
pub(crate) fn open_shared(
    dev: Arc<dyn BlockDevice>,
    label: &str,
    sb: &Superblock,
    params: SharedParams,
    host: &HostOptions,
    boot: u64,
    unflushed: &crate::pool::UnflushedPlace,
) -> Result<Pool> {
    let timing = Timing::from_ms(params.io_timeout_ms);
    let join = JoinOptions {
        host_id: host.host_id,
        host_name: host.host_name.clone().unwrap_or_else(local_host_name),
        watchdog: host.watchdog,
        run_dir: host.run_dir.clone().unwrap_or_else(default_run_dir),
    };
    let lease = HostLease::join(dev.clone(), sb.layout, &sb.uuid, timing, &join)?;
    let fenced: Arc<dyn BlockDevice> = Arc::new(FencedDevice {
        inner: dev,
        lease: lease.clone(),
    });
    let r = (|| {
        let guard = GlobalGuard::acquire(lease.clone(), fenced.clone(), LOCK_TIMEOUT)?;
        let claims = read_claims(fenced.as_ref(), &sb.layout)?;
        let pool = Pool::open_as(
            fenced.clone(),
            label,
            false,
            host.host_id,
            boot,
            unflushed,
            Some(SharedCtx::new(lease.clone())),
            Some(&claims),
        )?;
        pool.inner.ensure_space_locked()?;
        {
            let inner = &pool.inner;
            let mut g = inner.commit.lock();
            let ctl = g.as_mut().ok_or(Error::PoolReadOnly)?;
            inner.commit_locked(ctl)?;
            inner.checkpoint_locked(ctl)?;
        }
        pool.inner.drop_stale_activations_locked()?;
        drop(guard);
        pool.start_background()?;
        Ok(pool)
    })();
    if r.is_err() {
        lease.release();
    }
    r
}

fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn default_run_dir() -> PathBuf {
    crate::util::run_dir()
}

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

fn write_claims(dev: &dyn BlockDevice, layout: &Layout, all: &[Claim], seq: u64) -> Result<()> {
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

/// Newest valid superblock generation on the LUN.
fn disk_generation(dev: &dyn BlockDevice) -> Result<u64> {
    let mut best = None;
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        let b = read_block(dev, at).map_err(|e| Error::io("reading the superblock", e))?;
        if let Ok(sb) = Superblock::decode(&b, at) {
            best = best.max(Some(sb.generation));
        }
    }
    best.ok_or_else(|| Error::Corrupt("both superblock copies are damaged".into()))
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
    fn shared_ctx(&self) -> Option<&SharedCtx> {
        self.shared.as_ref()
    }

    /// Takes the global lock (on a shared pool; `None` on a single-host
    /// one) and brings this host's view up to date with the LUN, recovering
    /// dead hosts on the way.
    pub(crate) fn global(&self) -> Result<Option<GlobalGuard>> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(None);
        };
        self.writable()?;
        let g = GlobalGuard::acquire(sh.lease.clone(), self.dev.clone(), LOCK_TIMEOUT)?;
        self.refresh()?;
        Ok(Some(g))
    }

    fn refresh(&self) -> Result<()> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(());
        };
        sh.lease.observe()?;
        let dead = sh.lease.dead_hosts();
        let on_disk = disk_generation(self.dev.as_ref())?;
        if on_disk != self.state.lock().sb.generation || !dead.is_empty() {
            self.reload(&dead)?;
        }
        Ok(())
    }

    /// Re-reads the pool from the LUN (under the global lock). This host's
    /// own changes are folded into its trees first, so the LUN holds all of
    /// them, then the whole state is loaded again and swapped in.
    pub(crate) fn reload(&self, dead: &[(HostSlot, u32)]) -> Result<()> {
        let sh = self.shared_ctx().ok_or(Error::PoolReadOnly)?;
        let _stripes = self.lock_all_stripes();
        let mut guard = self.commit.lock();
        let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
        self.commit_locked(ctl)?;
        self.checkpoint_locked(ctl)?;
        let dev = self.dev.as_ref();
        let mut recovered = Vec::new();
        for (d, _) in dead {
            self.recover_host(d)?;
            recovered.push(d.host_id);
        }
        let loaded = load(dev, &self.label, 0, 0)?; // host 0: no journal replayed
        let mut fresh = loaded.state;
        let mut claims = read_claims(dev, &fresh.sb.layout)?;
        let mut st = self.state.lock();
        fresh.adopt_from(&mut st);
        // A recovered host's groups pass to this host.
        let mut claims_changed = false;
        for c in claims.iter_mut() {
            if c.owner != 0 && recovered.contains(&(c.owner as u32)) {
                c.owner = self.host_id as u16;
                c.generation += 1;
                claims_changed = true;
            }
        }
        if claims_changed {
            write_claims(dev, &fresh.sb.layout, &claims, fresh.sb.generation + 1)?;
        }
        *sh.group_free.lock() = restrict_to_claims(&mut fresh, &claims, self.host_id);
        *st = fresh;
        if !recovered.is_empty() {
            let mut released = false;
            for v in st.volumes.values_mut() {
                if recovered.contains(&(v.rec.active_host as u32)) {
                    v.rec.active_host = 0;
                    v.rec.active_gen = 0;
                    released = true;
                }
            }
            if released || claims_changed {
                self.write_catalog(&mut st)?;
            }
            for (d, fingerprint) in dead {
                free_dead_slot(dev, &st.sb.layout, d, *fingerprint);
            }
        }
        Ok(())
    }

    /// Replays a dead host's journal into the trees of the volumes it had
    /// active, exactly as that host would on its next start, by opening
    /// the pool as that host (allocating only in its groups) and closing it.
    fn recover_host(&self, dead: &HostSlot) -> Result<()> {
        let layout = self.state.lock().sb.layout;
        let mut claims = read_claims(self.dev.as_ref(), &layout)?;
        let d = dead.host_id;
        if !claims.iter().any(|c| c.owner as u32 == d) {
            // The recovery checkpoint needs somewhere to write nodes.
            if let Some(c) = claims.iter_mut().find(|c| c.owner == 0) {
                c.owner = d as u16;
                c.generation += 1;
                write_claims(self.dev.as_ref(), &layout, &claims, 1)?;
            }
        }
        log::info!(
            "host {d} ('{}') is dead; replaying its journal and releasing its volumes",
            dead.name
        );
        let tmp =
            crate::Pool::open_for_recovery(self.dev.clone(), &self.label, d, &claims, self.boot)?;
        tmp.close()
    }

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
        Err(Error::Busy(format!(
            "volume '{}' is active on host {h} ('{}'); release it there first (thinctl release)",
            st.display_name(owner_vol),
            sh.lease.name_of(h)
        )))
    }

    /// Takes the exclusive activation lease of a writable volume.
    pub(crate) fn activate(&self, name: &str) -> Result<u64> {
        let _g = self.global()?;
        let _ctl = self.commit.lock();
        let mut st = self.state.lock();
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
        if let Err(e) = self.write_catalog(&mut st) {
            if let Some(v) = st.volumes.get_mut(&id) {
                v.rec.active_host = 0;
                v.rec.active_gen = 0;
            }
            return Err(e);
        }
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
        let _g = self.global()?;
        let _ctl = self.commit.lock();
        let mut st = self.state.lock();
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

    /// Leaving the pool: release every activation and group claim (the
    /// trees already hold everything), then the host slot.
    pub(crate) fn leave(&self) -> Result<()> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(());
        };
        let r = (|| -> Result<()> {
            let _g = self.global()?;
            let _ctl = self.commit.lock();
            let mut st = self.state.lock();
            let layout = st.sb.layout;
            let mut claims = read_claims(self.dev.as_ref(), &layout)?;
            let me = self.host_id;
            // A host that holds nothing writes nothing: one without an
            // allocation group (more hosts than groups) has no block for a
            // new catalog, and its leaving must still succeed.
            if !claims.iter().any(|c| c.owner as u32 == me)
                && !st.volumes.values().any(|v| v.rec.active_host as u32 == me)
            {
                return Ok(());
            }
            for c in claims.iter_mut().filter(|c| c.owner as u32 == self.host_id) {
                c.owner = 0;
                c.generation += 1;
            }
            write_claims(self.dev.as_ref(), &layout, &claims, st.sb.generation + 1)?;
            for v in st.volumes.values_mut() {
                if v.rec.active_host as u32 == self.host_id {
                    v.rec.active_host = 0;
                    v.rec.active_gen = 0;
                }
            }
            self.write_catalog(&mut st)
        })();
        sh.lease.release();
        r
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

    pub(crate) fn lease(&self) -> Option<&Arc<HostLease>> {
        self.shared_ctx().map(|s| &s.lease)
    }
}

/// Marks a recovered host's slot free, unless it changed meanwhile (the
/// host restarted and rejoined).
fn free_dead_slot(dev: &dyn BlockDevice, layout: &Layout, dead: &HostSlot, fingerprint: u32) {
    let at = layout.host_slot(dead.host_id);
    let Ok(b) = read_block(dev, at) else { return };
    if crc32fast::hash(&b) != fingerprint {
        return;
    }
    let mut free = dead.clone();
    free.state = SlotState::Free;
    free.renewal += 1;
    let _ = write_blocks(dev, &[(at, free.encode(at))]);
}

/// Who holds what on a shared pool, as `thinctl lock status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockStatus {
    /// This process's host id, when it joined the pool.
    pub this_host: Option<u32>,
    pub io_timeout_ms: u32,
    pub hosts: Vec<crate::lease::HostView>,
    /// Hosts holding or waiting for the global lock.
    pub global_lock: Vec<u32>,
    /// (volume, host id, host's generation when it activated it).
    pub active_volumes: Vec<(String, u32, u64)>,
    /// (allocation group, owner host).
    pub groups: Vec<(u64, u32)>,
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

    /// Host slots, the global lock, volume activations and group claims.
    /// A process that has not joined watches the slots for `watch` to tell
    /// renewing hosts from silent ones.
    pub fn lock_status(&self, watch: Duration) -> Result<LockStatus> {
        let inner = &self.inner;
        let (layout, shared) = {
            let st = inner.state.lock();
            (st.sb.layout, st.sb.shared)
        };
        let Some(params) = shared else {
            return Err(Error::InvalidArgument(format!(
                "{} is a single-host pool: it has no leases (create it with --shared)",
                inner.label
            )));
        };
        let dev = inner.dev.as_ref();
        let read_slots = || -> Result<Vec<Option<HostSlot>>> {
            let at: Vec<u64> = (1..=layout.max_hosts)
                .map(|h| layout.host_slot(h))
                .collect();
            let buf = read_blocks(dev, &at, "reading host slots")?;
            Ok((1..=layout.max_hosts)
                .map(|h| {
                    let i = h as usize - 1;
                    HostSlot::decode(&buf[i], at[i], h).ok().flatten()
                })
                .collect())
        };
        let hosts = match inner.lease() {
            Some(lease) => {
                lease.observe()?;
                lease.hosts()
            }
            None => {
                let first = read_slots()?;
                std::thread::sleep(watch);
                let second = read_slots()?;
                first
                    .into_iter()
                    .zip(second)
                    .filter_map(|(a, b)| {
                        let s = b?;
                        let state = match s.state {
                            SlotState::Free => "free",
                            SlotState::Live if a.as_ref() != Some(&s) => "live",
                            SlotState::Live => "silent",
                        };
                        Some(crate::lease::HostView {
                            host_id: s.host_id,
                            name: s.name,
                            generation: s.generation,
                            renewal: s.renewal,
                            state,
                            unchanged_ms: None,
                            watched_ms: None,
                            dead_in_ms: None,
                            is_self: false,
                        })
                    })
                    .collect()
            }
        };
        let mut global_lock = Vec::new();
        let regs: Vec<u64> = (1..=layout.max_hosts)
            .map(|h| layout.lock_register(h))
            .collect();
        let buf = read_blocks(dev, &regs, "reading lock registers")?;
        for h in 1..=layout.max_hosts {
            let (i, at) = (h as usize - 1, layout.lock_register(h));
            if let Ok(Some(r)) = crate::format::lease::LockRegister::decode(&buf[i], at, h) {
                let current = hosts.iter().any(|v| {
                    v.host_id == h && v.generation == r.host_generation && v.state != "free"
                });
                if current && (r.number != 0 || r.choosing) {
                    global_lock.push(h);
                }
            }
        }
        let st = inner.state.lock();
        let active_volumes = st
            .volumes
            .values()
            .filter(|v| v.rec.active_host != 0)
            .map(|v| {
                (
                    st.display_name(v),
                    v.rec.active_host as u32,
                    v.rec.active_gen,
                )
            })
            .collect();
        drop(st);
        let groups = read_claims(dev, &layout)?
            .into_iter()
            .enumerate()
            .filter(|(_, c)| c.owner != 0)
            .map(|(g, c)| (g as u64, c.owner as u32))
            .collect();
        Ok(LockStatus {
            this_host: inner.lease().map(|l| l.host_id),
            io_timeout_ms: params.io_timeout_ms,
            hosts,
            global_lock,
            active_volumes,
            groups,
        })
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
                return Err(Error::Busy(format!(
                    "volume '{name}' is open on this host; close it (stop serving it) first"
                )));
            }
            v.rec.id
        };
        self.inner.deactivate(id)
    }

    /// Simulates this host dying: its lease stops being renewed and
    /// nothing is written or released (tests of dead-host recovery).
    #[doc(hidden)]
    pub fn simulate_crash(self) {
        if let Some(l) = self.inner.lease() {
            l.stop_renewing();
        }
        self.inner.stop_background();
        std::mem::forget(self);
    }

    /// Why this host may no longer write the pool (its lease was lost).
    pub fn lease_lost(&self) -> Option<String> {
        self.inner.lease().and_then(|l| l.lost_reason())
    }
}
