//! Helpers shared by the thinctl end-to-end tests: the thinctl runner,
//! private temporary directories (tempfile) and JSON lookups on
//! serde_json values that fail the test with the key's name.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_thinctl");

/// Runs thinctl with `args` (no pool added) in a clean environment: no
/// THINLUN_POOL from the caller, unless `env_pool` sets one. `stdin` is
/// fed from a thread, so a large input cannot deadlock with the output.
pub fn run_with(args: &[&str], stdin: Option<&[u8]>, env_pool: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("THINLUN_POOL");
    if let Some(p) = env_pool {
        cmd.env("THINLUN_POOL", p);
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn thinctl");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        return out;
    }
    child.wait_with_output().unwrap()
}

/// Runs thinctl on `pool`.
pub fn run(pool: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut all = vec!["-p", pool.to_str().expect("a UTF-8 test path")];
    all.extend_from_slice(args);
    run_with(&all, stdin, None)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs against `pool`, expects success, returns stdout.
pub fn ok(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args, None);
    assert!(
        out.status.success(),
        "thinctl {args:?} failed ({:?}): {}",
        out.status.code(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Expects exit `code` and exactly one `thinctl: ...` line on stderr;
/// returns that line.
pub fn one_error_line(out: &Output, code: i32, args: &[&str]) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "thinctl {args:?}: stderr {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr:?}");
    assert!(lines[0].starts_with("thinctl: "), "{stderr:?}");
    lines[0].to_string()
}

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
