//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use thinlun::dev::MemDevice;
use thinlun::{Pool, PoolConfig};

/// A scratch pool file, removed when dropped: in $THINLUN_TEST_DIR if set
/// (to run the file tests on a chosen file system), else the temp dir.
pub fn pool_file(name: &str) -> tempfile::NamedTempFile {
    let dir = std::env::var_os("THINLUN_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(&format!("thinlun-{name}-"))
        .suffix(".img")
        .tempfile_in(dir)
        .expect("a scratch pool file")
}

/// The tests' pool settings: 64 KiB chunks, so that a few MiB hold many,
/// and `max_hosts` host slots.
pub fn small_config(max_hosts: u32) -> PoolConfig {
    PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts,
        ..PoolConfig::default()
    }
}

/// A new pool ([`small_config`]) on an in-memory LUN of `size` bytes, and
/// the LUN, to check the pool or reopen a copy of it.
pub fn new_pool(size: u64, max_hosts: u32) -> (Arc<MemDevice>, Pool) {
    let dev = Arc::new(MemDevice::new(size));
    let pool = Pool::create(dev.clone(), "mem", &small_config(max_hosts)).unwrap();
    (dev, pool)
}

/// A new pool ([`small_config`]) of `size` bytes in the scratch file `f`
/// (see [`pool_file`]).
pub fn new_file_pool(f: &tempfile::NamedTempFile, size: u64, max_hosts: u32) -> Pool {
    let cfg = PoolConfig {
        size_bytes: Some(size),
        ..small_config(max_hosts)
    };
    Pool::create_path(f.path(), &cfg).unwrap()
}
