//! Boot-time clock and the kernel watchdog a host arms against itself.
//!
//! Lease arithmetic only ever subtracts two readings of this host's own
//! CLOCK_BOOTTIME (which keeps counting through suspend and SIGSTOP); no
//! clock is ever compared across hosts.

use std::io;
use std::time::Duration;

/// Milliseconds since boot (CLOCK_BOOTTIME).
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_BOOTTIME
    // exists on every Linux thinlun supports, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// A POSIX timer on CLOCK_BOOTTIME that delivers SIGKILL to this process
/// when it expires: the software analogue of sanlock's hardware watchdog.
/// A process that is frozen (SIGSTOP, a hung VM, swap storm) past its
/// fence deadline is killed by the kernel before any other host may
/// declare it dead, so it can never wake up and write.
pub struct KillTimer {
    id: libc::timer_t,
}

// SAFETY: a timer id is a kernel handle, valid from any thread of the
// process; the timer_* calls are thread-safe.
unsafe impl Send for KillTimer {}
// SAFETY: as above; arming concurrently from two threads only races on
// which deadline wins, and callers serialise that themselves.
unsafe impl Sync for KillTimer {}

impl KillTimer {
    pub fn new() -> io::Result<KillTimer> {
        // SAFETY: sigevent is a plain C struct for which all-zero is a
        // valid value; the fields we need are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_SIGNAL;
        sev.sigev_signo = libc::SIGKILL;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: both pointers refer to live locals for the call's duration.
        let r = unsafe { libc::timer_create(libc::CLOCK_BOOTTIME, &mut sev, &mut id) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(KillTimer { id })
    }

    /// (Re)arms the timer to fire `after` from now; zero disarms it.
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let mut its: libc::itimerspec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        if after.is_zero() {
            its.it_value.tv_nsec = 0;
        }
        // SAFETY: `id` is a live timer created above; `its` is a local.
        let r = unsafe { libc::timer_settime(self.id, 0, &its, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn disarm(&self) -> io::Result<()> {
        self.arm(Duration::ZERO)
    }
}

impl Drop for KillTimer {
    fn drop(&mut self) {
        // SAFETY: `id` was created by timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

/// Moves the calling thread to the SCHED_RR real-time class, as sanlock
/// does for its renewal threads, so a CPU-bound neighbour (a guest, a
/// compile) cannot delay a renewal past the fence time and cost this host
/// its lease. Needs CAP_SYS_NICE; without it the thread keeps its normal
/// priority and the result says why. The thread sleeps between renewals,
/// so real-time priority costs the rest of the machine nothing.
pub fn raise_to_realtime() -> io::Result<()> {
    // SAFETY: sched_get_priority_min only reads its argument.
    let priority = unsafe { libc::sched_get_priority_min(libc::SCHED_RR) };
    if priority < 0 {
        return Err(io::Error::last_os_error());
    }
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // that outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
