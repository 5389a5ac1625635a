//! Errors of the engine's public API.

use std::io;

/// Everything the engine can report. Messages are written for an admin
/// reading them on a terminal: they say what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A read, write, flush or other call on the LUN or a file failed.
    #[error("I/O error on {context}: {source}")]
    Io {
        /// What was being accessed (the LUN's label, a path, a region).
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Neither superblock copy carries the magic: the device (named by
    /// the string) holds something else, or nothing yet.
    #[error("{0} is not a thinlun pool (no superblock magic found)")]
    NotAPool(String),
    /// The pool was written by a newer thinlun, in a format this one cannot read.
    #[error("pool format version {found} is newer than this thinlun supports (up to {supported}); upgrade thinlun")]
    UnsupportedVersion {
        /// The version the pool's superblock records.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A metadata record failed its checks (checksum, bounds, cross
    /// references); the string says which record and how.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// No volume, snapshot or base of this name is in the catalog.
    #[error("volume '{0}' not found")]
    NoSuchVolume(String),
    /// The name to create or rename to is taken.
    #[error("volume '{0}' already exists")]
    VolumeExists(String),
    /// The name breaks the naming rule ([`is_valid_volume_name`](crate::is_valid_volume_name)).
    #[error("invalid volume name '{0}': use 1..=128 characters of A-Z a-z 0-9 . _ - (not starting with '-')")]
    InvalidName(String),
    /// A caller's argument is out of bounds or inconsistent (a size, an
    /// alignment, an option); the string is the whole message.
    #[error("{0}")]
    InvalidArgument(String),
    /// A write needed a new block and the pool has none free (ENOSPC).
    #[error("out of data space: the pool has no free block for this write")]
    NoSpace,
    /// A read or write reaches past the end of the volume (EINVAL).
    #[error("I/O beyond the end of volume '{volume}' (size {size} bytes, request ends at {end})")]
    OutOfRange {
        /// The volume addressed.
        volume: String,
        /// The volume's size in bytes.
        size: u64,
        /// The byte offset where the request ends.
        end: u64,
    },
    /// The volume is a snapshot or a base, or was opened read-only (EROFS).
    #[error("volume '{0}' is read-only")]
    ReadOnly(String),
    /// The pool was opened read-only, so nothing in it can change (EROFS).
    #[error("pool is open read-only")]
    PoolReadOnly,
    /// The change or open cannot be done now, or here; `kind` says why,
    /// for callers that act on it (wait, ask the serving process, tell
    /// the user to use --force).
    #[error("{message}")]
    Busy {
        /// The reason, to match on.
        kind: BusyKind,
        /// The whole message for the user.
        message: String,
    },
    /// Part of a volume's mapping tree could not be read: reads of that
    /// range and every write of the volume fail (EIO to a guest) until it
    /// is repaired. Other volumes are not affected.
    #[error("volume '{volume}' is damaged: {what}")]
    Damaged {
        /// The damaged volume.
        volume: String,
        /// Which part is unreadable, and why.
        what: String,
    },
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

/// The engine's result type: every fallible call returns an [`Error`].
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
