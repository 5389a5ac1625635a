//! Repeated error messages, rate-limited: a full pool fails every write,
//! and a line for each would drown the log (39,198 identical lines in 3 s
//! before this).

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Messages logged per window at most.
const PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(10);

/// One kind of repeated message.
pub struct LogLimit {
    window: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Whether a message goes out.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Log it, saying first how many were dropped since the last one.
    Log {
        suppressed: u64,
    },
    Drop,
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    fn admit(&self, now: Instant) -> Admit {
        let mut w = self.window.lock();
        if w.start.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < PER_WINDOW {
            w.logged += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            Admit::Drop
        }
    }

    /// Logs a warning unless this window's share is used up.
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        if let Admit::Log { suppressed } = self.admit(Instant::now()) {
            if suppressed > 0 {
                log::warn!("{} (and {suppressed} more like it before)", msg());
            } else {
                log::warn!("{}", msg());
            }
        }
    }
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_counted_then_the_next_window_logs_again() {
        let l = LogLimit::new();
        let t0 = Instant::now();
        let admitted = (0..1000)
            .filter(|_| matches!(l.admit(t0), Admit::Log { .. }))
            .count();
        assert_eq!(admitted, PER_WINDOW as usize);
        assert_eq!(l.admit(t0 + WINDOW), Admit::Log { suppressed: 995 });
        assert_eq!(l.admit(t0 + WINDOW), Admit::Log { suppressed: 0 });
    }
}
