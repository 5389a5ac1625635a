//! Space guards: what happens as a pool fills up. Warning thresholds, the
//! overcommit limit, the policy for writes that need space when there is
//! none (fail at once, or wait for space up to a timeout), returning free
//! space to the file or SAN (trim), and growing a pool onto a grown LUN.
//!
//! Running out of data space is an error for the writes that need new
//! blocks and nothing else: reads, overwrites of blocks a volume owns
//! alone, flush, discard and removals keep working, and metadata always
//! has its reserve (see `State::metadata_reserve`).

use crate::error::{Error, Result};
use crate::format::superblock::Policy;
use crate::format::{BLOCK_SIZE, MAX_BLOCKS};
use crate::map::state::State;
use crate::pool::{Inner, Pool};
use std::time::{Duration, Instant};

/// A warning threshold newly crossed (upwards) or cleared (downwards).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThresholdEvent {
    /// "data" or "metadata".
    pub kind: &'static str,
    /// The threshold, in percent.
    pub threshold_pct: u8,
    /// Use when the event was raised, in percent.
    pub used_pct: u8,
    /// Crossed upwards (else cleared).
    pub crossed: bool,
}

impl std::fmt::Display for ThresholdEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.crossed {
            write!(
                f,
                "pool {} use {}% crossed the {}% warning threshold",
                self.kind, self.used_pct, self.threshold_pct
            )
        } else {
            write!(
                f,
                "pool {} use {}% is back below the {}% warning threshold",
                self.kind, self.used_pct, self.threshold_pct
            )
        }
    }
}

/// Checks a policy before it is stored.
pub fn validate_policy(p: &Policy) -> Result<()> {
    for (kind, t) in [("data", p.data_warn_pct), ("metadata", p.meta_warn_pct)] {
        let set: Vec<u8> = t.iter().copied().filter(|&x| x != 0).collect();
        let given = || {
            set.iter()
                .map(|x| format!("{x}%"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if set.iter().any(|&x| x > 100) {
            return Err(Error::InvalidArgument(format!(
                "{kind} thresholds are percentages from 1 to 100 (given: {})",
                given()
            )));
        }
        if set.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidArgument(format!(
                "{kind} thresholds must increase, e.g. 80,90,95 (given: {})",
                given()
            )));
        }
    }
    if p.when_full > 1 {
        return Err(Error::InvalidArgument(
            "when-full policy must be 'error' or 'queue'".into(),
        ));
    }
    if p.max_overcommit_pct != 0 && p.max_overcommit_pct < 100 {
        return Err(Error::InvalidArgument(
            "the overcommit limit is a ratio of at least 1.0 (or 0 for none)".into(),
        ));
    }
    Ok(())
}

/// Data use in percent of the data area (0..=100).
pub(crate) fn data_used_pct(st: &State) -> u8 {
    let total = st.space.total_blocks().max(1);
    ((total - st.space.free_blocks()) * 100 / total) as u8
}

/// Metadata use: the share of the space metadata can still grow into that
/// it already uses (metadata lives in the data area, so it grows from it).
pub(crate) fn meta_used_pct(st: &State) -> u8 {
    let used = st.metadata_blocks() + st.metadata_reserve();
    let room = used + st.space.free_blocks();
    (used * 100 / room.max(1)).min(100) as u8
}

/// Thresholds at or below `pct`.
fn crossed(thresholds: [u8; 3], pct: u8) -> Vec<u8> {
    thresholds
        .iter()
        .copied()
        .filter(|&t| t != 0 && pct >= t)
        .collect()
}

pub(crate) fn crossed_names(st: &State) -> Vec<String> {
    let p = st.sb.policy;
    let mut out: Vec<String> = crossed(p.data_warn_pct, data_used_pct(st))
        .into_iter()
        .map(|t| format!("data {t}%"))
        .collect();
    out.extend(
        crossed(p.meta_warn_pct, meta_used_pct(st))
            .into_iter()
            .map(|t| format!("metadata {t}%")),
    );
    out
}

impl Pool {
    /// Stores a new policy (thresholds, when-full behaviour, overcommit
    /// limit) in the superblock.
    pub fn set_policy(&self, policy: Policy) -> Result<()> {
        validate_policy(&policy)?;
        self.inner.writable()?;
        let inner = &self.inner;
        let mut st = inner.pool_change()?;
        let old = st.sb.policy;
        st.sb.policy = policy;
        inner.write_catalog_or_undo(&mut st, |st| st.sb.policy = old)
    }

    /// Warning thresholds currently crossed, as "data 90%" style strings.
    pub fn thresholds_crossed(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        let p = st.sb.policy;
        let mut out: Vec<String> = crossed(p.data_warn_pct, data_used_pct(&st))
            .into_iter()
            .map(|t| format!("data {t}%"))
            .collect();
        out.extend(
            crossed(p.meta_warn_pct, meta_used_pct(&st))
                .into_iter()
                .map(|t| format!("metadata {t}%")),
        );
        out
    }

    /// Threshold crossings since the last call (each crossing reported
    /// once), for long-running processes to log.
    pub fn threshold_events(&self) -> Vec<ThresholdEvent> {
        let st = self.inner.state.lock();
        let p = st.sb.policy;
        let now = [
            (data_used_pct(&st), p.data_warn_pct, "data"),
            (meta_used_pct(&st), p.meta_warn_pct, "metadata"),
        ];
        let mut last = self.inner.threshold_seen.lock();
        let mut events = Vec::new();
        for (i, (pct, th, kind)) in now.into_iter().enumerate() {
            let level = crossed(th, pct).last().copied().unwrap_or(0);
            if level != last[i] {
                events.push(ThresholdEvent {
                    kind,
                    threshold_pct: level.max(last[i]),
                    used_pct: pct,
                    crossed: level > last[i],
                });
                last[i] = level;
            }
        }
        events
    }

    /// Punches the pool's free data blocks out of its file (or discards
    /// them on a block device when `discard_device`), so the file system or
    /// SAN gets the space back. Returns the bytes released.
    pub fn trim(&self, discard_device: bool) -> Result<u64> {
        self.inner.writable()?;
        // Make frees final first, so they can be trimmed too.
        self.inner.flush()?;
        // Allocation waits meanwhile: a block must not be handed out and
        // written while its hole is being punched.
        let st = self.inner.state.lock();
        let runs = st.space.free_runs();
        let is_block_device = self.inner.is_block_device;
        if is_block_device && !discard_device {
            return Ok(0);
        }
        let mut bytes = 0;
        for (p, n) in runs {
            let (off, len) = (p * BLOCK_SIZE as u64, n * BLOCK_SIZE as u64);
            self.inner
                .dev
                .discard(off, len)
                .map_err(|e| Error::io("trimming free space", e))?;
            bytes += len;
        }
        drop(st);
        Ok(bytes)
    }

    /// Grows the pool onto the whole of its (grown) file or LUN. Returns
    /// the new pool size in bytes.
    pub fn grow(&self) -> Result<u64> {
        self.inner.writable()?;
        let inner = &self.inner;
        let dev_bytes = inner
            .dev
            .size_bytes()
            .map_err(|e| Error::io("reading the LUN size", e))?;
        let mut st = inner.pool_change()?;
        let l = st.sb.layout;
        let new_blocks = (dev_bytes / BLOCK_SIZE as u64)
            .min(l.max_pool_blocks)
            .min(MAX_BLOCKS - 1);
        if new_blocks < l.pool_blocks {
            return Err(Error::InvalidArgument(format!(
                "the LUN ({dev_bytes} bytes) is smaller than the pool ({} bytes): pools do not shrink",
                l.pool_blocks * BLOCK_SIZE as u64
            )));
        }
        let mut grown = l;
        grown.pool_blocks = new_blocks;
        if grown.data_chunks() == l.data_chunks() {
            return Err(Error::InvalidArgument(format!(
                "nothing to grow: the LUN adds less than one chunk to the pool (pool {} bytes, LUN {dev_bytes} bytes)",
                l.pool_blocks * BLOCK_SIZE as u64
            )));
        }
        st.space.grow(&grown);
        st.sb.layout = grown;
        inner.write_catalog_or_undo(&mut st, |st| st.sb.layout = l)?;
        Ok(new_blocks * BLOCK_SIZE as u64)
    }
}

impl Inner {
    /// Waits for free space under the `queue` policy. Returns false when
    /// the policy is `error` or the timeout passed.
    pub(crate) fn wait_for_space(&self, needed_blocks: u64, since: Instant) -> bool {
        let timeout = {
            let st = self.state.lock();
            if st.sb.policy.when_full != 1 {
                return false;
            }
            Duration::from_millis(st.sb.policy.queue_timeout_ms as u64)
        };
        loop {
            // Frees waiting for a commit become usable right after one.
            if self.state.lock().pending_free_blocks() > 0 {
                let _ = self.flush();
            }
            {
                let st = self.state.lock();
                if st.space.free_blocks() >= needed_blocks + st.metadata_reserve() {
                    return true;
                }
            }
            if since.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50).min(timeout));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_validation() {
        assert!(validate_policy(&Policy::default()).is_ok());
        let bad = [
            Policy {
                data_warn_pct: [90, 80, 95],
                ..Policy::default()
            },
            Policy {
                meta_warn_pct: [80, 90, 101],
                ..Policy::default()
            },
            Policy {
                when_full: 2,
                ..Policy::default()
            },
            Policy {
                max_overcommit_pct: 50,
                ..Policy::default()
            },
        ];
        for p in bad {
            assert!(validate_policy(&p).is_err(), "{p:?}");
        }
        assert!(validate_policy(&Policy {
            data_warn_pct: [0, 0, 90],
            ..Policy::default()
        })
        .is_ok());
    }
}
