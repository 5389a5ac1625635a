//! Helpers shared by the thinctl end-to-end tests: private temporary
//! directories (tempfile) and JSON lookups on serde_json values that fail
//! the test with the key's name.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

pub use serde_json::Value as J;

/// A private directory under the system temp dir, removed when dropped.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix(&format!("thinctl-test-{test}-"))
                .tempdir()
                .unwrap(),
        )
    }

    pub fn root(&self) -> &Path {
        self.0.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Writes `data` to a file in the directory; returns its path.
    pub fn file(&self, name: &str, data: &[u8]) -> String {
        let p = self.path(name);
        fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    }
}

/// Lookups that panic with what was missing: tests read `--json` output.
pub trait JExt {
    /// Parses a whole document (trailing data fails).
    fn parse(s: &str) -> J;
    /// The field `key` of an object.
    fn at(&self, key: &str) -> &J;
    fn num(&self, key: &str) -> f64;
    fn str(&self, key: &str) -> &str;
    fn arr(&self) -> &[J];
}

impl JExt for J {
    fn parse(s: &str) -> J {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    fn at(&self, key: &str) -> &J {
        self.as_object()
            .unwrap_or_else(|| panic!("not an object: {self}"))
            .get(key)
            .unwrap_or_else(|| panic!("no key {key} in {self}"))
    }

    fn num(&self, key: &str) -> f64 {
        let v = self.at(key);
        v.as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number: {v}"))
    }

    fn str(&self, key: &str) -> &str {
        let v = self.at(key);
        v.as_str()
            .unwrap_or_else(|| panic!("{key} is not a string: {v}"))
    }

    fn arr(&self) -> &[J] {
        self.as_array()
            .unwrap_or_else(|| panic!("not an array: {self}"))
    }
}
