//! Errors of the engine's public API.

use std::io;

/// Everything the engine can report. Messages are written for an admin
/// reading them on a terminal: they say what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a thinlun pool (no superblock magic found)")]
    NotAPool(String),
    #[error("pool format version {found} is newer than this thinlun supports (up to {supported}); upgrade thinlun")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    #[error("volume '{0}' not found")]
    NoSuchVolume(String),
    #[error("volume '{0}' already exists")]
    VolumeExists(String),
    #[error("invalid volume name '{0}': use 1..=128 characters of A-Z a-z 0-9 . _ - (not starting with '-')")]
    InvalidName(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("out of data space: the pool has no free block for this write")]
    NoSpace,
    #[error("I/O beyond the end of volume '{volume}' (size {size} bytes, request ends at {end})")]
    OutOfRange { volume: String, size: u64, end: u64 },
    #[error("volume '{0}' is read-only")]
    ReadOnly(String),
    #[error("pool is open read-only")]
    PoolReadOnly,
    /// The change or open cannot be done now, or here; `kind` says why,
    /// for callers that act on it (wait, ask the serving process, tell
    /// the user to use --force).
    #[error("{message}")]
    Busy { kind: BusyKind, message: String },
    /// Part of a volume's mapping tree could not be read: reads of that
    /// range and every write of the volume fail (EIO to a guest) until it
    /// is repaired. Other volumes are not affected.
    #[error("volume '{volume}' is damaged: {what}")]
    Damaged { volume: String, what: String },
}

/// Why an [`Error::Busy`] was returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyKind {
    /// Another process of this machine has the pool open for writing.
    PoolOpenElsewhere,
    /// This host id's lease is held by another process of this machine.
    HostIdInUseHere,
    /// Another host uses this host id.
    HostIdInUse,
    /// The pool's global lock was not had in time.
    GlobalLock,
    /// The volume is open (served) in this process or on this host.
    VolumeOpen,
    /// The volume is active on another host.
    ActiveElsewhere,
    /// Snapshots or linked clones depend on the volume.
    HasDependents,
    /// Damage elsewhere in the pool makes the change unsafe until repair.
    Damaged,
    /// The pool stopped accepting writes after an earlier error.
    Stopped,
    /// The target holds data that the change would replace: --force.
    NeedsForce,
    /// A failed change could not be undone (the message says what is left).
    UndoFailed,
    /// Something changed underneath; trying again may succeed.
    Retry,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn busy(kind: BusyKind, message: impl Into<String>) -> Self {
        Error::Busy {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a block-device front end (vhost-user-blk, NBD) should report.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace => libc::ENOSPC,
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly(_) | Error::PoolReadOnly => libc::EROFS,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}
