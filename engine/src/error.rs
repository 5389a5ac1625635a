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
    #[error("{0}")]
    Busy(String),
    /// Part of a volume's mapping tree could not be read: reads of that
    /// range and every write of the volume fail (EIO to a guest) until it
    /// is repaired. Other volumes are not affected.
    #[error("volume '{volume}' is damaged: {what}")]
    Damaged { volume: String, what: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
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
