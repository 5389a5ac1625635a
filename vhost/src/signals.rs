//! Stopping a server on SIGTERM or SIGINT.
//!
//! The signals are blocked in every thread (the mask is inherited, so
//! [`block_stop_signals`] must run before any thread is started, including
//! the engine's) and received by one thread with `sigwait`, which then
//! stops the server: no async-signal-safety constraints, and no thread is
//! ever killed by a default handler mid-batch.

use crate::server::StopHandle;
use std::io;

/// SIGTERM and SIGINT, blocked in the calling thread and so in every
/// thread it starts afterwards.
pub struct StopSignals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM and SIGINT in the calling thread.
pub fn block_stop_signals() -> io::Result<StopSignals> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; the old mask is not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(StopSignals { set })
}

impl StopSignals {
    /// Starts the thread that waits for a signal and stops the server.
    /// Returns the signal's number through the join handle.
    pub fn stop_on_signal(self, stop: StopHandle) -> io::Result<std::thread::JoinHandle<i32>> {
        let set = self.set;
        std::thread::Builder::new()
            .name("thinlun-signals".to_string())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                loop {
                    // SAFETY: `set` is an initialised sigset_t and `sig` a
                    // valid out-pointer.
                    let r = unsafe { libc::sigwait(&set, &mut sig) };
                    if r == 0 {
                        break;
                    }
                }
                stop.stop();
                sig
            })
    }
}
