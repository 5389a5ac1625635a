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
//!
//! Here: the shared context, joining, the global lock and reloading;
//! `groups` (allocation-group claims), `recovery` (dead hosts), `activation`
//! (one writer per volume) and `status` (`thinctl lock status`).

mod activation;
mod groups;
mod recovery;
mod status;

pub(crate) use activation::HolderWait;
use groups::write_claims;
pub(crate) use groups::{read_claims, restrict_to_claims};
use recovery::free_dead_slot;
pub use status::LockStatus;

use crate::dev::{read_block, BlockDevice};
use crate::error::{Error, Result};
use crate::format::lease::HostSlot;
use crate::format::superblock::{SharedParams, Superblock};
use crate::format::{SUPERBLOCK_A, SUPERBLOCK_B};
use crate::lease::{FencedDevice, GlobalGuard, HostLease, JoinOptions, Timing};
use crate::load::load;
use crate::pool::{HostOptions, Inner};
use crate::Pool;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
        // Damage another host's tree brought (or a salvage removed) gates
        // this host's I/O from now on: a read of a lost range must fail,
        // not read as the hole the map has there.
        self.damaged.store(st.is_damaged(), Ordering::Release);
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

    /// Leaving the pool: release every activation and group claim (the
    /// trees already hold everything), then the host slot.
    pub(crate) fn leave(&self) -> Result<()> {
        let Some(sh) = self.shared_ctx() else {
            return Ok(());
        };
        let r = (|| -> Result<()> {
            let mut st = self.pool_change()?;
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

    pub(crate) fn lease(&self) -> Option<&Arc<HostLease>> {
        self.shared_ctx().map(|s| &s.lease)
    }
}

impl Pool {
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
