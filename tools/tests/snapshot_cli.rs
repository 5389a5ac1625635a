//! End-to-end tests of thinctl's snapshot, base image, clone, rollback,
//! flatten, du, diff, export-diff and import-diff commands, against real
//! pool files in a private temporary directory.

use std::fs;
use std::path::{Path, PathBuf};

mod common;
use common::{ok, one_error_line, run, text, JExt, TempDir, J};

const BLOCK: usize = 4096;
const MIB: usize = 1 << 20;

/// Expects exit code 1 and exactly one `thinctl: ...` line on stderr;
/// returns that line.
fn fails_in(pool: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    fails_with_code(pool, 1, args, stdin)
}

/// [`fails_in`] with exit code `code` (2: a usage error).
fn fails_with_code(pool: &Path, code: i32, args: &[&str], stdin: Option<&[u8]>) -> String {
    one_error_line(&run(pool, args, stdin), code, args)
}

fn fails(pool: &Path, args: &[&str]) -> String {
    fails_in(pool, args, None)
}

fn new_pool(dir: &TempDir, name: &str) -> PathBuf {
    let pool = dir.path(name);
    ok(
        &pool,
        &["pool", "create", "--size", "64M", "--chunk-size", "64K"],
    );
    pool
}

/// The volume's content, through `export` to stdout.
fn content(pool: &Path, vol: &str) -> Vec<u8> {
    let out = run(pool, &["export", vol, "-"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    out.stdout
}

/// Names in `list` order (snapshots indented under their volume).
fn listed(pool: &Path) -> Vec<String> {
    ok(pool, &["list"])
        .lines()
        .skip(1)
        .map(|l| {
            let indent = l.len() - l.trim_start().len();
            let name = l.split_whitespace().next().unwrap_or("");
            format!("{}{name}", " ".repeat(indent))
        })
        .collect()
}

/// Pseudo-random bytes, never zero, from `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8 | 1
        })
        .collect()
}

/// An image of `len` bytes, zero except for `regions` (offset, len, seed).
fn image(len: usize, regions: &[(usize, usize, u64)]) -> Vec<u8> {
    let mut img = vec![0u8; len];
    for &(at, n, seed) in regions {
        img[at..at + n].copy_from_slice(&noise(n, seed));
    }
    img
}

#[test]
fn snapshot_list_rollback_remove() {
    let dir = TempDir::new("snap");
    let pool = new_pool(&dir, "pool.img");
    ok(&pool, &["create", "vm-1-disk-0", "4M"]);
    let a = image(4 * MIB, &[(0, 64 * 1024, 1), (MIB, 8192, 2)]);
    ok(&pool, &["import", "vm-1-disk-0", &dir.file("a.raw", &a)]);
    let out = ok(&pool, &["snapshot", "vm-1-disk-0@s1"]);
    assert!(out.contains("'vm-1-disk-0@s1'"), "{out}");

    // Names that exist or are not snapshot names; nothing changes.
    let err = fails(&pool, &["snapshot", "vm-1-disk-0@s1"]);
    assert!(err.contains("'vm-1-disk-0@s1' already exists"), "{err}");
    let err = fails_with_code(&pool, 2, &["snapshot", "vm-1-disk-0@bad/x"], None);
    assert!(err.contains("invalid volume name"), "{err}");
    let err = fails(&pool, &["snapshot", "vm-1-disk-0"]);
    assert!(err.contains("VOL@SNAP"), "{err}");
    let err = fails_with_code(&pool, 2, &["snapshot", "vm-1-disk-0@s1@x"], None);
    assert!(err.contains("invalid volume name"), "{err}");
    let err = fails(&pool, &["snapshot", "ghost@s1"]);
    assert!(err.contains("'ghost' not found"), "{err}");
    assert_eq!(listed(&pool), ["vm-1-disk-0", "  vm-1-disk-0@s1"]);

    let b = image(2 * MIB, &[(0, 8192, 3), (MIB + 4096, 4096, 4)]);
    ok(&pool, &["import", "vm-1-disk-0", &dir.file("b.raw", &b)]);
    ok(&pool, &["snapshot", "vm-1-disk-0@s2"]);
    ok(&pool, &["create", "other", "1M"]);
    assert_eq!(
        listed(&pool),
        [
            "other",
            "vm-1-disk-0",
            "  vm-1-disk-0@s1",
            "  vm-1-disk-0@s2"
        ]
    );
    let list = ok(&pool, &["list"]);
    assert!(list.lines().next().unwrap().contains("ORIGIN"), "{list}");
    let s1 = list.lines().find(|l| l.contains("@s1")).unwrap();
    assert!(
        s1.contains("ro,snap") && s1.contains("snapshot of vm-1-disk-0"),
        "{list}"
    );
    let json = J::parse(&ok(&pool, &["list", "--json"]));
    let vols = json.arr();
    assert_eq!(vols.len(), 4);
    assert_eq!(vols[2].str("name"), "vm-1-disk-0@s1");
    assert_eq!(vols[2].str("snapshot_of"), "vm-1-disk-0");
    assert_eq!(vols[2].at("snapshot"), &J::Bool(true));
    assert_eq!(vols[2].at("read_only"), &J::Bool(true));
    assert_eq!(vols[2].num("mapped_bytes"), (18 * BLOCK) as f64);

    // Snapshots keep their content; they cannot be written.
    assert_eq!(content(&pool, "vm-1-disk-0@s1"), a);
    let mut now = b.clone();
    now.extend_from_slice(&a[2 * MIB..]);
    assert_eq!(content(&pool, "vm-1-disk-0"), now);
    let err = fails(&pool, &["import", "vm-1-disk-0@s1", &dir.file("c.raw", &b)]);
    assert!(err.contains("'vm-1-disk-0@s1' is read-only"), "{err}");
    for size in ["8M", "4K"] {
        let err = fails(&pool, &["resize", "vm-1-disk-0@s1", size, "--force"]);
        assert!(err.contains("'vm-1-disk-0@s1' is read-only"), "{err}");
    }
    assert_eq!(content(&pool, "vm-1-disk-0@s1"), a);

    // Rollback past a newer snapshot needs --force, which removes it.
    let err = fails(&pool, &["rollback", "vm-1-disk-0@s1"]);
    assert!(
        err.contains("vm-1-disk-0@s2") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(content(&pool, "vm-1-disk-0"), now);
    let err = fails(&pool, &["rollback", "vm-1-disk-0"]);
    assert!(err.contains("not a snapshot"), "{err}");
    let out = ok(&pool, &["rollback", "vm-1-disk-0@s1", "--force"]);
    assert!(
        out.contains("rolled back 'vm-1-disk-0' to 'vm-1-disk-0@s1'")
            && out.contains("removed newer snapshots: vm-1-disk-0@s2"),
        "{out}"
    );
    assert_eq!(content(&pool, "vm-1-disk-0"), a);
    assert_eq!(listed(&pool), ["other", "vm-1-disk-0", "  vm-1-disk-0@s1"]);
    // The newest snapshot needs no --force.
    ok(&pool, &["import", "vm-1-disk-0", &dir.file("b2.raw", &b)]);
    ok(&pool, &["rollback", "vm-1-disk-0@s1"]);
    assert_eq!(content(&pool, "vm-1-disk-0"), a);

    // Remove: a snapshot alone; a volume with snapshots only recursively.
    ok(&pool, &["snapshot", "vm-1-disk-0@s3"]);
    let out = ok(&pool, &["remove", "vm-1-disk-0@s1"]);
    assert!(out.contains("removed snapshot 'vm-1-disk-0@s1'"), "{out}");
    let err = fails(&pool, &["remove", "vm-1-disk-0"]);
    assert!(
        err.contains("vm-1-disk-0@s3") && err.contains("--recursive"),
        "{err}"
    );
    assert_eq!(listed(&pool), ["other", "vm-1-disk-0", "  vm-1-disk-0@s3"]);
    let out = ok(&pool, &["remove", "vm-1-disk-0", "--recursive"]);
    assert!(
        out.contains("removed volume 'vm-1-disk-0' and its snapshots vm-1-disk-0@s3"),
        "{out}"
    );
    assert_eq!(listed(&pool), ["other"]);
    let status = J::parse(&ok(&pool, &["pool", "status", "--json"]));
    assert_eq!(
        status.num("data_used_bytes"),
        status.num("metadata_used_bytes"),
        "all data space returned"
    );
    assert!(ok(&pool, &["check"]).trim_end().ends_with("clean"));
}

#[test]
fn base_clone_flatten() {
    let dir = TempDir::new("clone");
    let pool = new_pool(&dir, "pool.img");
    ok(&pool, &["create", "vm-100-disk-0", "4M"]);
    let img = image(4 * MIB, &[(0, 256 * 1024, 5), (3 * MIB, 4096, 6)]);
    ok(
        &pool,
        &["import", "vm-100-disk-0", &dir.file("a.raw", &img)],
    );

    let err = fails(&pool, &["clone", "vm-100-disk-0", "c0"]);
    assert!(err.contains("is a live volume"), "{err}");
    assert_eq!(listed(&pool), ["vm-100-disk-0"]);

    let out = ok(
        &pool,
        &["base", "vm-100-disk-0", "--name", "base-100-disk-0"],
    );
    assert!(
        out.contains("'base-100-disk-0' is now a read-only base"),
        "{out}"
    );
    let err = fails(
        &pool,
        &["import", "base-100-disk-0", &dir.file("b.raw", &img)],
    );
    assert!(err.contains("read-only"), "{err}");
    let err = fails(&pool, &["resize", "base-100-disk-0", "8M"]);
    assert!(err.contains("read-only"), "{err}");
    let err = fails(&pool, &["base", "base-100-disk-0@x"]);
    assert!(err.contains("not found"), "{err}");

    ok(&pool, &["clone", "base-100-disk-0", "vm-101-disk-0"]);
    ok(&pool, &["clone", "base-100-disk-0", "vm-102-disk-0"]);
    let err = fails(&pool, &["clone", "base-100-disk-0", "vm-101-disk-0"]);
    assert!(err.contains("already exists"), "{err}");
    let list = ok(&pool, &["list"]);
    let line = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in {list}"))
            .to_string()
    };
    assert!(line("base-100-disk-0").contains("ro,base"), "{list}");
    assert!(
        line("vm-101-disk-0").contains("clone")
            && line("vm-101-disk-0").contains("clone of base-100-disk-0"),
        "{list}"
    );
    let j = J::parse(&ok(&pool, &["info", "vm-101-disk-0", "--json"]));
    assert_eq!(j.str("clone_of"), "base-100-disk-0");
    assert_eq!(j.at("clone"), &J::Bool(true));
    assert_eq!(content(&pool, "vm-101-disk-0"), img);

    // A base in use cannot be removed; the message names its clones.
    let err = fails(&pool, &["remove", "base-100-disk-0"]);
    assert!(
        err.contains("linked clones")
            && err.contains("vm-101-disk-0")
            && err.contains("vm-102-disk-0"),
        "{err}"
    );
    assert_eq!(
        listed(&pool),
        ["base-100-disk-0", "vm-101-disk-0", "vm-102-disk-0"]
    );

    // Clones are writable and independent of each other.
    let patch = image(8192, &[(0, 8192, 7)]);
    ok(
        &pool,
        &["import", "vm-101-disk-0", &dir.file("p.raw", &patch)],
    );
    let mut img101 = img.clone();
    img101[..8192].copy_from_slice(&patch);
    assert_eq!(content(&pool, "vm-101-disk-0"), img101);
    assert_eq!(content(&pool, "vm-102-disk-0"), img);
    assert_eq!(content(&pool, "base-100-disk-0"), img);

    // Flatten copies what is still shared: 65 blocks minus the 2 rewritten.
    let out = ok(&pool, &["flatten", "vm-101-disk-0"]);
    assert!(
        out.contains(&format!("({} bytes)", 63 * BLOCK)) && out.contains("from 'base-100-disk-0'"),
        "{out}"
    );
    let err = fails(&pool, &["flatten", "vm-101-disk-0"]);
    assert!(err.contains("not a linked clone"), "{err}");
    assert_eq!(content(&pool, "vm-101-disk-0"), img101);
    let j = J::parse(&ok(&pool, &["info", "vm-101-disk-0", "--json"]));
    assert_eq!(j.at("clone"), &J::Bool(false));
    let err = fails(&pool, &["remove", "base-100-disk-0"]);
    assert!(
        err.contains("vm-102-disk-0") && !err.contains("vm-101-disk-0"),
        "{err}"
    );
    ok(&pool, &["remove", "vm-102-disk-0"]);
    ok(&pool, &["remove", "base-100-disk-0"]);
    assert_eq!(content(&pool, "vm-101-disk-0"), img101);
    let du = J::parse(&ok(&pool, &["du", "vm-101-disk-0", "--json"]));
    let v = &du.at("volumes").arr()[0];
    assert_eq!(v.num("exclusive_bytes"), (65 * BLOCK) as f64);
    assert_eq!(v.num("shared_bytes"), 0.0);

    // Clones of snapshots; rollback across a clone is refused.
    ok(&pool, &["snapshot", "vm-101-disk-0@s1"]);
    ok(
        &pool,
        &["import", "vm-101-disk-0", &dir.file("q.raw", &img)],
    );
    ok(&pool, &["snapshot", "vm-101-disk-0@s2"]);
    ok(&pool, &["clone", "vm-101-disk-0@s2", "test-clone"]);
    let err = fails(&pool, &["rollback", "vm-101-disk-0@s1", "--force"]);
    assert!(
        err.contains("linked clones") && err.contains("test-clone"),
        "{err}"
    );
    assert_eq!(content(&pool, "vm-101-disk-0"), img);
    assert_eq!(
        listed(&pool),
        [
            "test-clone",
            "vm-101-disk-0",
            "  vm-101-disk-0@s1",
            "  vm-101-disk-0@s2"
        ]
    );
    let err = fails(&pool, &["remove", "vm-101-disk-0", "--recursive"]);
    assert!(err.contains("test-clone"), "{err}");
    ok(&pool, &["flatten", "test-clone"]);
    ok(&pool, &["rollback", "vm-101-disk-0@s1", "--force"]);
    assert_eq!(content(&pool, "vm-101-disk-0"), img101);
    assert_eq!(content(&pool, "test-clone"), img);
    assert!(ok(&pool, &["check"]).trim_end().ends_with("clean"));
}

#[test]
fn du_figures_are_exact() {
    let dir = TempDir::new("du");
    let pool = new_pool(&dir, "pool.img");
    ok(&pool, &["create", "vol", "4M"]);
    // 16 data blocks, then a snapshot, then 4 of them rewritten.
    let a = image(64 * 1024, &[(0, 64 * 1024, 8)]);
    ok(&pool, &["import", "vol", &dir.file("a.raw", &a)]);
    ok(&pool, &["snapshot", "vol@s"]);
    let b = image(16 * 1024, &[(0, 16 * 1024, 9)]);
    ok(&pool, &["import", "vol", &dir.file("b.raw", &b)]);
    ok(&pool, &["create", "empty", "1M"]);

    let du = J::parse(&ok(&pool, &["du", "--json"]));
    let rows = du.at("volumes").arr();
    let names: Vec<&str> = rows.iter().map(|r| r.str("name")).collect();
    assert_eq!(names, ["empty", "vol", "vol@s"]);
    let k = 1024.0;
    let figures = |r: &J| {
        [
            r.num("provisioned_bytes"),
            r.num("mapped_bytes"),
            r.num("exclusive_bytes"),
            r.num("shared_bytes"),
        ]
    };
    assert_eq!(figures(&rows[0]), [1024.0 * k, 0.0, 0.0, 0.0]);
    assert_eq!(
        figures(&rows[1]),
        [4096.0 * k, 64.0 * k, 16.0 * k, 48.0 * k]
    );
    assert_eq!(
        figures(&rows[2]),
        [4096.0 * k, 64.0 * k, 16.0 * k, 48.0 * k]
    );
    assert_eq!(rows[2].str("snapshot_of"), "vol");
    let p = du.at("pool");
    assert_eq!(p.num("exclusive_bytes"), 32.0 * k);
    assert_eq!(p.num("shared_bytes"), 48.0 * k);
    assert_eq!(p.num("pending_free_bytes"), 0.0);
    assert_eq!(
        p.num("data_used_bytes") - p.num("metadata_bytes"),
        80.0 * k,
        "16 + 4 blocks of data"
    );

    let text = ok(&pool, &["du"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME")
            && lines[0].contains("PROVISIONED")
            && lines[0].contains("EXCLUSIVE")
            && lines[0].contains("SHARED"),
        "{text}"
    );
    let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(cols(lines[2]), ["vol", "4.0M", "64K", "16K", "48K"]);
    assert_eq!(cols(lines[3]), ["vol@s", "4.0M", "64K", "16K", "48K"]);
    assert!(lines[3].starts_with("  vol@s"), "{text}");
    assert!(
        text.contains("shared:") && text.contains("(49152 bytes)"),
        "{text}"
    );

    // One volume with its snapshots; one snapshot.
    let one = J::parse(&ok(&pool, &["du", "vol", "--json"]));
    assert_eq!(one.at("volumes").arr().len(), 2);
    let one = J::parse(&ok(&pool, &["du", "vol@s", "--json"]));
    assert_eq!(one.at("volumes").arr().len(), 1);
    let err = fails(&pool, &["du", "ghost"]);
    assert!(err.contains("'ghost' not found"), "{err}");

    // Removing the snapshot frees exactly its exclusive bytes.
    let before = J::parse(&ok(&pool, &["pool", "status", "--json"]));
    ok(&pool, &["remove", "vol@s"]);
    let after = J::parse(&ok(&pool, &["pool", "status", "--json"]));
    let data = |j: &J| j.num("data_used_bytes") - j.num("metadata_used_bytes");
    assert_eq!(data(&before) - data(&after), 16.0 * k);
}

#[test]
fn diff_lists_changed_extents() {
    let dir = TempDir::new("diff");
    let pool = new_pool(&dir, "pool.img");
    ok(&pool, &["create", "vol", "4M"]);
    let a = image(2 * MIB, &[(0, 64 * 1024, 1), (MIB, 4096, 2)]);
    ok(&pool, &["import", "vol", &dir.file("a.raw", &a)]);
    ok(&pool, &["snapshot", "vol@s1"]);
    ok(&pool, &["snapshot", "vol@s2"]);
    let out = ok(&pool, &["diff", "vol@s1", "vol@s2"]);
    assert_eq!(
        out,
        "0 extents, 0B (0 bytes) changed from 'vol@s1' to 'vol@s2'\n"
    );
    // Rewrite blocks 2..4 and write block 300.
    let mut b = a[..MIB + 4096].to_vec();
    b[2 * BLOCK..4 * BLOCK].copy_from_slice(&noise(2 * BLOCK, 3));
    b.resize(300 * BLOCK, 0);
    b.extend_from_slice(&noise(BLOCK, 4));
    ok(&pool, &["import", "vol", &dir.file("b.raw", &b)]);

    let out = ok(&pool, &["diff", "vol@s1", "vol"]);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // import rewrites every data block of its image: blocks 0..16 and 256
    // are new copies too.
    assert_eq!(lines[0], ["OFFSET", "LENGTH"]);
    assert_eq!(lines[1], ["0", &(16 * BLOCK).to_string()]);
    assert_eq!(lines[2], ["1048576", "4096"]);
    assert_eq!(lines[3], [(300 * BLOCK).to_string().as_str(), "4096"]);
    let total = 18 * BLOCK;
    assert!(
        out.ends_with(&format!(
            "3 extents, 72K ({total} bytes) changed from 'vol@s1' to 'vol'\n"
        )),
        "{out}"
    );
    let j = J::parse(&ok(&pool, &["diff", "vol@s1", "vol", "--json"]));
    assert_eq!(j.num("changed_bytes"), total as f64);
    assert_eq!(j.num("extent_count"), 3.0);
    let ext = j.at("extents").arr();
    assert_eq!(ext[2].num("offset"), (300 * BLOCK) as f64);
    assert_eq!(ext[2].num("length"), BLOCK as f64);

    // A short image rewrites only its own 3 blocks.
    ok(&pool, &["snapshot", "vol@s3"]);
    let c = noise(3 * BLOCK, 5);
    ok(&pool, &["import", "vol", &dir.file("c.raw", &c)]);
    let j = J::parse(&ok(&pool, &["diff", "vol@s3", "vol", "--json"]));
    assert_eq!(j.num("changed_bytes"), (3 * BLOCK) as f64);

    ok(&pool, &["create", "other", "4M"]);
    ok(&pool, &["snapshot", "other@x"]);
    for (from, to, want) in [
        ("vol", "vol@s1", "needs a snapshot"),
        ("vol@s1", "other", "same volume"),
        ("vol@s1", "other@x", "same volume"),
        ("vol@s2", "vol@s1", "older"),
        ("vol@nope", "vol", "not found"),
    ] {
        let err = fails(&pool, &["diff", from, to]);
        assert!(err.contains(want), "{from} {to}: {err}");
    }
}

#[test]
fn export_diff_and_import_diff_carry_incremental_backups() {
    let dir = TempDir::new("backup");
    let src = new_pool(&dir, "src.img");
    let dst = new_pool(&dir, "dst.img");
    ok(&src, &["create", "vm", "8M"]);
    let a = image(
        8 * MIB,
        &[(0, 300 * 1024, 1), (3 * MIB, 8192, 2), (7 * MIB, 4096, 3)],
    );
    ok(&src, &["import", "vm", &dir.file("a.raw", &a)]);
    ok(&src, &["snapshot", "vm@mon"]);
    // Tuesday: part of the start rewritten, a hole punched, and growth.
    let mut b = a[..3 * MIB + 8192].to_vec();
    b[..8192].copy_from_slice(&noise(8192, 4));
    b[100 * 1024..200 * 1024].fill(0);
    ok(&src, &["import", "vm", &dir.file("b.raw", &b)]);
    ok(&src, &["resize", "vm", "12M"]);
    let c = image(12 * MIB, &[(10 * MIB, 5 * 4096, 5)]);
    let mut tue = b.clone();
    tue.extend_from_slice(&a[b.len()..]);
    tue.resize(12 * MIB, 0);
    tue[10 * MIB..10 * MIB + 5 * 4096].copy_from_slice(&c[10 * MIB..10 * MIB + 5 * 4096]);
    // (import rewrites every data block of its image: all are new copies.)
    ok(&src, &["import", "vm", &dir.file("tue.raw", &tue)]);
    ok(&src, &["snapshot", "vm@tue"]);
    assert_eq!(content(&src, "vm@tue"), tue);

    // Full stream of Monday (FROM given as -), then Monday -> Tuesday.
    let full = dir.path("full.td");
    let incr = dir.path("incr.td");
    let (full_s, incr_s) = (full.to_str().unwrap(), incr.to_str().unwrap());
    let out = ok(&src, &["export-diff", "-", "vm@mon", full_s]);
    assert!(out.contains("exported all of 'vm@mon'"), "{out}");
    let out = ok(&src, &["export-diff", "vm@mon", "vm@tue", incr_s]);
    assert!(
        out.contains("exported changes from 'vm@mon' to 'vm@tue'"),
        "{out}"
    );
    // The other spellings give the same bytes; stdout carries the stream alone.
    let piped = run(&src, &["export-diff", "--from", "mon", "vm@tue", "-"], None);
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    assert_eq!(piped.stdout, fs::read(&incr).unwrap());
    let piped = run(&src, &["export-diff", "vm@mon", "-"], None);
    assert_eq!(piped.stdout, fs::read(&full).unwrap());
    let err = fails(&src, &["export-diff", "vm@mon", "vm@tue", incr_s]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    ok(
        &src,
        &["export-diff", "vm@mon", "vm@tue", incr_s, "--force"],
    );
    let y = dir.path("y.td");
    let y_s = y.to_str().unwrap();
    let err = fails(
        &src,
        &["export-diff", "--from", "mon", "vm@mon", "vm@tue", y_s],
    );
    assert!(err.contains("not both"), "{err}");
    let err = fails(
        &src,
        &["export-diff", "vm@tue", "vm@mon", y.to_str().unwrap()],
    );
    assert!(err.contains("older"), "{err}");
    assert!(!y.exists(), "a failed export left a file");

    // Applied onto a second pool: first the full stream (from stdin).
    let err = fails(&dst, &["import-diff", "vm", incr_s]);
    assert!(err.contains("does not exist"), "{err}");
    let out = run(
        &dst,
        &["import-diff", "vm", "-"],
        Some(&fs::read(&full).unwrap()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("created snapshot 'vm@mon'"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(listed(&dst), ["vm", "  vm@mon"]);
    assert_eq!(content(&dst, "vm@mon"), a);
    let out = ok(&dst, &["import-diff", "vm", incr_s]);
    assert!(out.contains("created snapshot 'vm@tue'"), "{out}");
    assert_eq!(listed(&dst), ["vm", "  vm@mon", "  vm@tue"]);
    assert_eq!(content(&dst, "vm@tue"), tue);
    assert_eq!(content(&dst, "vm"), tue);
    assert_eq!(content(&dst, "vm@mon"), a);
    // The copy exports the same streams, byte for byte.
    let again = run(&dst, &["export-diff", "mon", "vm@tue", "-"], None);
    assert_eq!(again.stdout, fs::read(&incr).unwrap());
    let again = run(&dst, &["export-diff", "-", "vm@mon", "-"], None);
    assert_eq!(again.stdout, fs::read(&full).unwrap());
    // Thin on both sides: the copy maps what the source maps.
    let mapped = |p: &Path, v: &str| J::parse(&ok(p, &["info", v, "--json"])).num("mapped_bytes");
    assert_eq!(mapped(&dst, "vm@tue"), mapped(&src, "vm@tue"));
    assert_eq!(mapped(&dst, "vm@mon"), mapped(&src, "vm@mon"));
    assert!(ok(&dst, &["check"]).trim_end().ends_with("clean"));

    // Applied twice: the TO snapshot exists; nothing changes.
    let err = fails(&dst, &["import-diff", "vm", incr_s]);
    assert!(err.contains("'vm@tue' already exists"), "{err}");
    assert_eq!(listed(&dst), ["vm", "  vm@mon", "  vm@tue"]);
}

#[test]
fn import_diff_refuses_bad_input_and_changes_nothing() {
    let dir = TempDir::new("badstream");
    let src = new_pool(&dir, "src.img");
    let dst = new_pool(&dir, "dst.img");
    ok(&src, &["create", "vm", "4M"]);
    let a = image(4 * MIB, &[(0, 128 * 1024, 1), (2 * MIB, 64 * 1024, 2)]);
    ok(&src, &["import", "vm", &dir.file("a.raw", &a)]);
    ok(&src, &["snapshot", "vm@s1"]);
    let b = image(
        3 * MIB,
        &[(64 * 1024, 256 * 1024, 3), (2 * MIB + 8192, 4096, 4)],
    );
    ok(&src, &["import", "vm", &dir.file("b.raw", &b)]);
    ok(&src, &["snapshot", "vm@s2"]);
    let full = run(&src, &["export-diff", "vm@s1", "-"], None).stdout;
    let incr = run(&src, &["export-diff", "s1", "vm@s2", "-"], None).stdout;
    assert!(!full.is_empty() && !incr.is_empty());
    let incr_f = dir.file("incr.td", &incr);

    // Starting point missing: no volume, then a volume without the snapshot.
    let err = fails(&dst, &["import-diff", "vm", &incr_f]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(listed(&dst).is_empty());
    ok(&dst, &["create", "vm", "4M"]);
    let err = fails(&dst, &["import-diff", "vm", &incr_f]);
    assert!(err.contains("'vm@s1' does not exist"), "{err}");
    let junk = image(8192, &[(0, 8192, 9)]);
    ok(&dst, &["import", "vm", &dir.file("junk.raw", &junk)]);
    // A full stream only goes into an empty or new volume.
    let err = fails_in(&dst, &["import-diff", "vm", "-"], Some(&full));
    assert!(err.contains("not empty"), "{err}");
    ok(&dst, &["remove", "vm"]);
    let out = run(&dst, &["import-diff", "vm", "-"], Some(&full));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The volume changed since s1: refused, nothing changed.
    ok(&dst, &["import", "vm", &dir.file("junk2.raw", &junk)]);
    let before = content(&dst, "vm");
    let status = |p: &Path| J::parse(&ok(p, &["pool", "status", "--json"])).num("data_used_bytes");
    let used = status(&dst);
    let err = fails(&dst, &["import-diff", "vm", &incr_f]);
    assert!(
        err.contains("has changed since 'vm@s1'") && err.contains("roll it back"),
        "{err}"
    );
    assert_eq!(content(&dst, "vm"), before);
    assert_eq!(listed(&dst), ["vm", "  vm@s1"]);
    assert_eq!(status(&dst), used);

    // Into a snapshot or a base: refused.
    let err = fails(&dst, &["import-diff", "vm@s1", &incr_f]);
    assert!(err.contains("read-only"), "{err}");
    ok(&dst, &["create", "tpl", "4M"]);
    ok(&dst, &["base", "tpl"]);
    let err = fails_in(&dst, &["import-diff", "tpl", "-"], Some(&full));
    assert!(err.contains("'tpl' is read-only"), "{err}");
    ok(&dst, &["remove", "tpl"]);

    // Back at s1: corrupt or truncated streams fail, whatever byte is hit,
    // and leave the volume as it was (no leftover snapshot either).
    ok(&dst, &["rollback", "vm@s1"]);
    let at_s1 = content(&dst, "vm");
    assert_eq!(at_s1, a);
    let n = incr.len();
    for (i, at) in [10, 60, n / 2, n - 40, n - 2].into_iter().enumerate() {
        let mut bad = incr.clone();
        bad[at] ^= 0x10;
        let err = fails_in(&dst, &["import-diff", "vm", "-"], Some(&bad));
        assert!(err.contains("not a valid diff stream"), "byte {at}: {err}");
        if i == 2 {
            assert!(err.contains("checksum"), "{err}");
        }
        assert_eq!(listed(&dst), ["vm", "  vm@s1"], "byte {at}");
        assert_eq!(content(&dst, "vm"), at_s1, "byte {at}");
    }
    let err = fails_in(&dst, &["import-diff", "vm", "-"], Some(&incr[..n - 1]));
    assert!(err.contains("truncated"), "{err}");
    let err = fails_in(&dst, &["import-diff", "vm", "-"], Some(&incr[..n / 2]));
    assert!(err.contains("truncated"), "{err}");
    let err = fails_in(
        &dst,
        &["import-diff", "vm", "-"],
        Some(b"not a stream at all, sorry"),
    );
    assert!(err.contains("not a valid diff stream"), "{err}");
    let err = fails_in(&dst, &["import-diff", "vm", "-"], Some(b""));
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(listed(&dst), ["vm", "  vm@s1"]);
    assert_eq!(content(&dst, "vm"), at_s1);
    // A full stream that breaks off leaves no new volume behind.
    let err = fails_in(
        &dst,
        &["import-diff", "new", "-"],
        Some(&full[..full.len() - 3]),
    );
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(listed(&dst), ["vm", "  vm@s1"]);
    assert!(ok(&dst, &["check"]).trim_end().ends_with("clean"));

    // And the intact stream still applies.
    ok(&dst, &["import-diff", "vm", &incr_f]);
    let mut s2 = b.clone();
    s2.extend_from_slice(&a[b.len()..]);
    assert_eq!(content(&dst, "vm@s2"), s2);
}
