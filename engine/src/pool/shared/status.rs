//! `thinctl lock status`: hosts, the global lock, active volumes, group
//! claims.

use super::groups::read_claims;
use crate::dev::read_blocks;
use crate::error::{Error, Result};
use crate::format::lease::{HostSlot, SlotState};
use crate::Pool;
use std::time::Duration;

/// Who holds what on a shared pool, as `thinctl lock status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockStatus {
    /// This process's host id, when it joined the pool.
    pub this_host: Option<u32>,
    /// The lease I/O timeout every interval derives from.
    pub io_timeout_ms: u32,
    /// Every host slot in use or once used.
    pub hosts: Vec<crate::lease::HostView>,
    /// Hosts holding or waiting for the global lock.
    pub global_lock: Vec<u32>,
    /// (volume, host id, host's generation when it activated it).
    pub active_volumes: Vec<(String, u32, u64)>,
    /// (allocation group, owner host).
    pub groups: Vec<(u64, u32)>,
}

impl Pool {
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
}
