//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

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
