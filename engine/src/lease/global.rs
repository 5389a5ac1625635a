//! The pool's global lock: Lamport's bakery algorithm over one register
//! block per host in the lock area. Each host writes only its own block
//! and reads the others, so the lock needs nothing but reads and writes of
//! the LUN; the bakery is correct even when a read that overlaps a write
//! returns garbage (a torn block fails its checksum and is read again).
//!
//! A host that dies holding a ticket blocks the others only until its
//! slot has stayed unchanged for the dead time; from then on its register
//! is ignored (it fenced itself long before, so it can never write again).

use super::clock::now_ms;
use super::host::HostLease;
use crate::dev::read_blocks;
use crate::dev::{write_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::lease::LockRegister;
use std::sync::Arc;
use std::time::Duration;

/// Holding the global lock; dropping it releases the lock.
pub(crate) struct GlobalGuard {
    lease: Arc<HostLease>,
    dev: Arc<dyn BlockDevice>,
}

impl GlobalGuard {
    /// Waits for and takes the global lock. Fails if this host's lease is
    /// lost while waiting, or when `timeout` passes.
    pub fn acquire(
        lease: Arc<HostLease>,
        dev: Arc<dyn BlockDevice>,
        timeout: Duration,
    ) -> Result<GlobalGuard> {
        let me = lease.host_id;
        let write_reg = |choosing: bool, number: u64| -> Result<()> {
            let at = lease.layout.lock_register(me);
            let r = LockRegister {
                host_id: me,
                host_generation: lease.generation,
                choosing,
                number,
            };
            write_blocks(dev.as_ref(), &[(at, r.encode(at))])
                .map_err(|e| Error::io("writing this host's lock register", e))
        };
        let guard = GlobalGuard {
            lease: lease.clone(),
            dev: dev.clone(),
        };
        write_reg(true, 0)?;
        let regs = read_registers(&lease, dev.as_ref())?;
        let number = 1 + regs
            .iter()
            .flatten()
            .filter(|r| r.host_id != me)
            .map(|r| r.number)
            .max()
            .unwrap_or(0);
        write_reg(false, number)?;
        let start = now_ms();
        let mut pause = Duration::from_micros(500);
        let mut waiting: Vec<u32> = (1..=lease.layout.max_hosts).filter(|&h| h != me).collect();
        loop {
            let regs = read_registers(&lease, dev.as_ref())?;
            waiting.retain(|&h| {
                let Some(r) = regs.get(h as usize - 1).copied().flatten() else {
                    return false;
                };
                let current = lease.generation_of(h);
                let live = if lease.is_damaged(h) {
                    lease.holds(h, 0)
                } else {
                    current == Some(r.host_generation) && lease.holds(h, r.host_generation)
                };
                if !live {
                    // An earlier incarnation's register, a free slot, or a
                    // host found dead: it cannot be in the critical section.
                    return false;
                }
                r.choosing || (r.number != 0 && (r.number, h) < (number, me))
            });
            if waiting.is_empty() {
                return Ok(guard);
            }
            lease
                .check_write()
                .map_err(|e| Error::io("waiting for the global lock", e))?;
            if now_ms() - start > timeout.as_millis() as u64 {
                let who: Vec<String> = waiting.iter().map(|&h| lease.name_of(h)).collect();
                return Err(Error::busy(
                    crate::BusyKind::GlobalLock,
                    format!(
                        "timed out waiting for the pool's global lock (held or wanted by {})",
                        who.join(", ")
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
            let _ = lease.observe();
        }
    }
}

impl Drop for GlobalGuard {
    fn drop(&mut self) {
        let me = self.lease.host_id;
        let at = self.lease.layout.lock_register(me);
        let r = LockRegister {
            host_id: me,
            host_generation: self.lease.generation,
            choosing: false,
            number: 0,
        };
        // If this fails the register still holds a ticket; others wait
        // until this host is seen dead, or until it releases next time.
        let _ = write_blocks(self.dev.as_ref(), &[(at, r.encode(at))]);
    }
}

/// Reads all registers in one I/O; a torn or damaged register is read as
/// "choosing" (wait and look again) rather than as absent.
fn read_registers(lease: &HostLease, dev: &dyn BlockDevice) -> Result<Vec<Option<LockRegister>>> {
    let l = &lease.layout;
    let regs: Vec<u64> = (1..=l.max_hosts).map(|h| l.lock_register(h)).collect();
    let buf = read_blocks(dev, &regs, "reading the lock registers")?;
    Ok((1..=l.max_hosts)
        .map(
            |h| match LockRegister::decode(&buf[h as usize - 1], l.lock_register(h), h) {
                Ok(r) => r,
                Err(_) => Some(LockRegister {
                    host_id: h,
                    host_generation: lease.generation_of(h).unwrap_or(0),
                    choosing: true,
                    number: 0,
                }),
            },
        )
        .collect())
}
