//! End-to-end tests of the `thinctl` binary: every command against a real
//! pool file in a private temporary directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::{ok, one_error_line, run_with, text, JExt, TempDir, BIN, J};

const BLOCK: usize = 4096;
const MIB: usize = 1 << 20;

fn pool_args<'a>(pool: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["-p", pool.to_str().unwrap()];
    all.extend_from_slice(args);
    all
}

/// Expects failure with `code` and exactly one `thinctl: ...` line on
/// stderr; returns that line.
fn fails_with(code: i32, args: &[&str], stdin: Option<&[u8]>) -> String {
    one_error_line(&run_with(args, stdin, None), code, args)
}

fn fails(pool: &Path, args: &[&str]) -> String {
    fails_with(1, &pool_args(pool, args), None)
}

fn new_pool(dir: &TempDir) -> PathBuf {
    let pool = dir.path("pool.img");
    ok(
        &pool,
        &["pool", "create", "--size", "64M", "--chunk-size", "64K"],
    );
    pool
}

/// An image with data, zero regions and an unaligned tail; returns it and
/// how many of its 4 KiB blocks hold data.
fn sample_image() -> (Vec<u8>, usize) {
    let len = 3 * MIB + 5 * BLOCK + 1000;
    let mut img = vec![0u8; len];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut fill = |range: std::ops::Range<usize>, img: &mut Vec<u8>| {
        for b in &mut img[range] {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8 | 1;
        }
    };
    fill(0..2 * BLOCK, &mut img); // blocks 0, 1
    fill(MIB + 100..MIB + 200, &mut img); // block 256
    fill(2 * MIB - 10..2 * MIB + 10, &mut img); // blocks 511, 512 (straddles chunks)
    fill(len - 10..len, &mut img); // the last, partial block
    let data_blocks = img
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert_eq!(data_blocks, 6);
    (img, data_blocks)
}

#[test]
fn pool_create_and_status() {
    let dir = TempDir::new("status");
    let pool = dir.path("pool.img");
    let out = ok(
        &pool,
        &["pool", "create", "--size", "64M", "--chunk-size", "64K"],
    );
    assert!(out.starts_with("created pool "), "{out}");
    assert_eq!(fs::metadata(&pool).unwrap().len(), 64 << 20);

    ok(&pool, &["create", "a", "1G"]);
    ok(&pool, &["create", "b", "64M"]);
    let table = ok(&pool, &["pool", "status"]);
    for want in [
        "size:",
        "64M (67108864 bytes)",
        "chunk size:",
        "64K",
        "data used:",
        "data free:",
        "metadata used:",
        "metadata reserved:",
        "volumes:",
        "provisioned:",
        "1.1G",
        "overcommit:",
        "journal:",
        "uuid:",
        "format version:",
        "data warnings at:",
        "80%, 90%, 95%",
    ] {
        assert!(table.contains(want), "{want:?} missing from:\n{table}");
    }
    // Values start in one column.
    let columns: Vec<usize> = table
        .lines()
        .map(|l| {
            l.find(':').unwrap() + 1 + l[l.find(':').unwrap() + 1..].find(|c| c != ' ').unwrap()
        })
        .collect();
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{table}");

    let json = J::parse(&ok(&pool, &["pool", "status", "--json"]));
    assert_eq!(json.num("size_bytes"), (64 << 20) as f64);
    assert_eq!(json.num("chunk_bytes"), 65536.0);
    assert_eq!(json.num("volumes"), 2.0);
    assert_eq!(
        json.num("provisioned_bytes"),
        ((1 << 30) + (64 << 20)) as f64
    );
    let data = json.num("data_bytes");
    let ratio = json.num("overcommit_ratio");
    assert!((ratio - json.num("provisioned_bytes") / data).abs() < 1e-3);
    assert_eq!(
        json.num("data_used_bytes") + json.num("data_free_bytes"),
        data
    );
    // New pools are format 2: ditto nodes, two copies of each tree node.
    assert_eq!(json.num("format_version"), 2.0);
    assert_eq!(json.num("node_copies"), 2.0);
    assert_eq!(json.str("uuid").len(), 36);
    assert_eq!(json.str("pool"), pool.to_str().unwrap());
    assert_eq!(json.at("policy").at("data_warn_pct").arr().len(), 3);

    // An existing pool is not overwritten without --force.
    let err = fails(&pool, &["pool", "create"]);
    assert!(err.contains("--force"), "{err}");
    ok(&pool, &["pool", "create", "--force"]);
    assert_eq!(
        J::parse(&ok(&pool, &["pool", "status", "--json"])).num("volumes"),
        0.0
    );
}

#[test]
fn pool_create_rejects_bad_settings() {
    let dir = TempDir::new("create-bad");
    let pool = dir.path("pool.img");
    let err = fails(&pool, &["pool", "create"]);
    assert!(err.contains("--size"), "{err}");
    let err = fails(&pool, &["pool", "create", "--size", "1000000"]);
    assert!(err.contains("multiple of 4 KiB"), "{err}");
    let err = fails(&pool, &["pool", "create", "--size", "1M"]);
    assert!(err.contains("too small"), "{err}");
    assert!(
        !pool.exists(),
        "a failed create must not leave a file behind"
    );
    let err = fails(
        &pool,
        &["pool", "create", "--size", "64M", "--chunk-size", "100K"],
    );
    assert!(err.contains("power of two"), "{err}");
    let err = fails_with(
        2,
        &pool_args(
            &pool,
            &["pool", "create", "--size", "64M", "--max-hosts", "0"],
        ),
        None,
    );
    assert!(err.contains("--max-hosts"), "{err}");
}

#[test]
fn volume_lifecycle() {
    let dir = TempDir::new("lifecycle");
    let pool = new_pool(&dir);
    let out = ok(&pool, &["create", "vm-100-disk-0", "1G"]);
    assert!(
        out.contains("'vm-100-disk-0'") && out.contains("1.0G"),
        "{out}"
    );
    ok(&pool, &["create", "base-9000-disk-1", "1.5G"]);

    let list = ok(&pool, &["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("SIZE"),
        "{list}"
    );
    assert!(lines[1].starts_with("base-9000-disk-1") && lines[1].contains("1.5G"));
    assert!(lines[2].starts_with("vm-100-disk-0") && lines[2].contains("1.0G"));
    // Right-aligned SIZE column: rows end the size at the same column.
    let end = |l: &str, s: &str| l.find(s).unwrap() + s.len();
    assert_eq!(end(lines[0], "SIZE"), end(lines[1], "1.5G"));
    assert_eq!(end(lines[0], "SIZE"), end(lines[2], "1.0G"));

    let json = J::parse(&ok(&pool, &["list", "--json"]));
    let vols = json.arr();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0].str("name"), "base-9000-disk-1");
    assert_eq!(vols[0].num("size_bytes"), (3u64 << 29) as f64);
    assert_eq!(vols[1].num("mapped_bytes"), 0.0);

    let info = ok(&pool, &["info", "vm-100-disk-0"]);
    assert!(info.contains("1.0G (1073741824 bytes)"), "{info}");
    assert!(info.contains("UTC"), "{info}");
    let j = J::parse(&ok(&pool, &["info", "vm-100-disk-0", "--json"]));
    assert_eq!(j.num("size_bytes"), (1u64 << 30) as f64);
    assert_eq!(j.at("read_only"), &J::Bool(false));

    // Grow; shrink only with --force.
    ok(&pool, &["resize", "vm-100-disk-0", "2G"]);
    let size = |name: &str| J::parse(&ok(&pool, &["info", name, "--json"])).num("size_bytes");
    assert_eq!(size("vm-100-disk-0"), (2u64 << 30) as f64);
    let err = fails(&pool, &["resize", "vm-100-disk-0", "512M"]);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(size("vm-100-disk-0"), (2u64 << 30) as f64);
    ok(&pool, &["resize", "vm-100-disk-0", "512M", "--force"]);
    assert_eq!(size("vm-100-disk-0"), (512u64 << 20) as f64);

    let out = ok(&pool, &["rename", "vm-100-disk-0", "vm-101-disk-0"]);
    assert!(out.contains("'vm-101-disk-0'"), "{out}");
    let err = fails(&pool, &["info", "vm-100-disk-0"]);
    assert!(err.contains("not found"), "{err}");
    assert_eq!(size("vm-101-disk-0"), (512u64 << 20) as f64);

    ok(&pool, &["remove", "vm-101-disk-0"]);
    ok(&pool, &["remove", "base-9000-disk-1"]);
    assert_eq!(ok(&pool, &["list"]).lines().count(), 1);
    assert_eq!(ok(&pool, &["list", "--json"]).trim(), "[]");
    assert!(ok(&pool, &["check"]).contains("clean"));
}

#[test]
fn import_export_keeps_volumes_thin() {
    let dir = TempDir::new("import");
    let pool = new_pool(&dir);
    let (img, data_blocks) = sample_image();
    let src = dir.path("src.raw");
    fs::write(&src, &img).unwrap();

    let out = ok(&pool, &["import", "disk", src.to_str().unwrap()]);
    assert!(out.contains(&format!("({} bytes)", img.len())), "{out}");
    // Six 4 KiB blocks of data (sample_image), the rest zeros.
    assert_eq!(data_blocks * BLOCK, 24 << 10);
    assert!(out.contains("24K of data written"), "{out}");
    let info = J::parse(&ok(&pool, &["info", "disk", "--json"]));
    let rounded = img.len().div_ceil(BLOCK) * BLOCK;
    assert_eq!(info.num("size_bytes"), rounded as f64);
    // Zero blocks took no space.
    assert_eq!(info.num("mapped_bytes"), (data_blocks * BLOCK) as f64);

    // Out to a file: identical bytes (plus zero padding to whole blocks),
    // and sparse.
    let dst = dir.path("dst.raw");
    let out = ok(&pool, &["export", "disk", dst.to_str().unwrap()]);
    assert!(
        out.contains(&format!("({} bytes) of it data", data_blocks * BLOCK)),
        "{out}"
    );
    let back = fs::read(&dst).unwrap();
    assert_eq!(back.len(), rounded);
    assert!(back[..img.len()] == img[..], "exported image differs");
    assert!(back[img.len()..].iter().all(|&b| b == 0));
    {
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            allocated < (rounded / 2) as u64,
            "export should be sparse: {allocated} bytes allocated"
        );
    }
    // Never clobbered without --force.
    let err = fails(&pool, &["export", "disk", dst.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    ok(&pool, &["export", "disk", dst.to_str().unwrap(), "--force"]);
    assert_eq!(fs::read(&dst).unwrap(), back);

    // Out to stdout: every byte.
    let out = run_with(&pool_args(&pool, &["export", "disk", "-"]), None, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout == back, "stdout export differs");

    // Importing over existing data: blocks that are zero in the new image
    // must read as zeros and be unmapped, not keep the old data.
    let mut img2 = vec![0u8; img.len()];
    img2[MIB + 100..MIB + 200].copy_from_slice(&img[MIB + 100..MIB + 200]);
    img2[5 * BLOCK] = 7;
    let src2 = dir.path("src2.raw");
    fs::write(&src2, &img2).unwrap();
    ok(&pool, &["import", "disk", src2.to_str().unwrap()]);
    let dst2 = dir.path("dst2.raw");
    ok(&pool, &["export", "disk", dst2.to_str().unwrap()]);
    let back2 = fs::read(&dst2).unwrap();
    assert!(back2[..img2.len()] == img2[..], "re-import differs");
    let info = J::parse(&ok(&pool, &["info", "disk", "--json"]));
    assert_eq!(info.num("mapped_bytes"), (2 * BLOCK) as f64);

    // An image larger than the existing volume is refused up front.
    let big = dir.path("big.raw");
    fs::write(&big, vec![1u8; rounded + BLOCK]).unwrap();
    let err = fails(&pool, &["import", "disk", big.to_str().unwrap()]);
    assert!(err.contains("larger than volume"), "{err}");
    assert!(ok(&pool, &["check"]).contains("clean"));
}

#[test]
fn import_from_stdin() {
    let dir = TempDir::new("stdin");
    let pool = new_pool(&dir);
    let (img, data_blocks) = sample_image();

    let err = fails_with(1, &pool_args(&pool, &["import", "piped", "-"]), Some(&img));
    assert!(err.contains("--size"), "{err}");
    let err = fails_with(
        1,
        &pool_args(&pool, &["import", "piped", "-", "--size", "1M"]),
        Some(&img),
    );
    assert!(err.contains("larger than volume"), "{err}");
    assert!(err.contains("removed"), "{err}");
    assert!(fails(&pool, &["info", "piped"]).contains("not found"));

    let out = run_with(
        &pool_args(&pool, &["import", "piped", "-", "--size", "8M"]),
        Some(&img),
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("({} bytes) from stdin", img.len())));
    let info = J::parse(&ok(&pool, &["info", "piped", "--json"]));
    assert_eq!(info.num("size_bytes"), (8 * MIB) as f64);
    assert_eq!(info.num("mapped_bytes"), (data_blocks * BLOCK) as f64);

    let out = run_with(&pool_args(&pool, &["export", "piped", "-"]), None, None);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 8 * MIB);
    assert!(out.stdout[..img.len()] == img[..]);
    assert!(out.stdout[img.len()..].iter().all(|&b| b == 0));
}

#[test]
fn pool_from_environment_and_missing_pool() {
    let dir = TempDir::new("env");
    let pool = new_pool(&dir);
    let out = run_with(&["create", "from-env", "4M"], None, Some(&pool));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(ok(&pool, &["list"]).contains("from-env"));

    let err = fails_with(2, &["list"], None);
    assert!(
        err.contains("--pool") && err.contains("THINLUN_POOL"),
        "{err}"
    );
    let missing = dir.path("nope.img");
    let err = fails(&missing, &["list"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = fails(&missing, &["create", "v", "4M"]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn rejects_bad_input() {
    let dir = TempDir::new("bad");
    let pool = new_pool(&dir);

    // Not a pool.
    let junk = dir.path("junk.img");
    fs::write(&junk, vec![0u8; MIB]).unwrap();
    for args in [&["list"][..], &["pool", "status"], &["create", "v", "1M"]] {
        let err = fails(&junk, args);
        assert!(err.contains("not a thinlun pool"), "{err}");
    }
    let err = fails(dir.root(), &["list"]);
    assert!(err.contains("not a regular file"), "{err}");

    // Names.
    let err = fails_with(2, &pool_args(&pool, &["create", "bad/name", "1M"]), None);
    assert!(err.contains("invalid volume name"), "{err}");
    let err = fails_with(2, &pool_args(&pool, &["create", "a b", "1M"]), None);
    assert!(err.contains("invalid volume name"), "{err}");
    ok(&pool, &["create", "v", "1M"]);
    ok(&pool, &["create", "w", "1M"]);
    let err = fails(&pool, &["create", "v", "1M"]);
    assert!(err.contains("already exists"), "{err}");
    let err = fails(&pool, &["rename", "v", "w"]);
    assert!(err.contains("already exists"), "{err}");
    let err = fails_with(2, &pool_args(&pool, &["rename", "v", "no/pe"]), None);
    assert!(err.contains("invalid volume name"), "{err}");

    // Sizes: garbage and zero are usage errors; unaligned is refused.
    for (size, want) in [
        ("abc", "not a size"),
        ("12Q", "unknown unit"),
        ("1.2.3G", "not a size"),
        ("0", "greater than zero"),
        ("99999999999999999999", "too large"),
        ("0.1K", "whole number"),
    ] {
        let err = fails_with(2, &pool_args(&pool, &["create", "x", size]), None);
        assert!(err.contains(want), "{size}: {err}");
    }
    let err = fails(&pool, &["create", "x", "1000"]);
    assert!(err.contains("multiple of 4 KiB"), "{err}");
    let err = fails(&pool, &["resize", "v", "5000"]);
    assert!(err.contains("multiple of 4 KiB"), "{err}");

    // Anything on a volume that does not exist.
    let out_file = dir.path("out.raw");
    let out_str = out_file.to_str().unwrap();
    for args in [
        &["info", "ghost"][..],
        &["resize", "ghost", "1M"],
        &["rename", "ghost", "spirit"],
        &["remove", "ghost"],
        &["export", "ghost", out_str],
        &["export", "ghost", "-"],
    ] {
        let err = fails(&pool, args);
        assert!(err.contains("volume 'ghost' not found"), "{args:?}: {err}");
    }
    assert!(
        !out_file.exists(),
        "export of a missing volume created a file"
    );
    let err = fails(
        &pool,
        &["import", "v", dir.path("no-such-file").to_str().unwrap()],
    );
    assert!(err.contains("No such file"), "{err}");

    // clap's own errors are one line too.
    let err = fails_with(2, &pool_args(&pool, &["frobnicate"]), None);
    assert!(err.contains("frobnicate"), "{err}");
    let err = fails_with(2, &pool_args(&pool, &["create", "only-name"]), None);
    assert!(err.contains("<SIZE>"), "{err}");
}

#[test]
fn check_reports_health() {
    let dir = TempDir::new("check");
    let pool = new_pool(&dir);
    ok(&pool, &["create", "v", "4M"]);
    let src = dir.path("src.raw");
    fs::write(&src, sample_image().0).unwrap();
    ok(&pool, &["import", "v", src.to_str().unwrap()]);

    let out = ok(&pool, &["check"]);
    assert!(
        out.contains("1 volume and 0 snapshots,") && out.trim_end().ends_with("clean"),
        "{out}"
    );
    let j = J::parse(&ok(&pool, &["check", "--read-only", "--json"]));
    assert_eq!(j.at("clean"), &J::Bool(true));
    assert_eq!(j.at("errors").arr().len(), 0);
    assert_eq!(j.num("volumes"), 1.0);

    let image = fs::read(&pool).unwrap();
    let damaged = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = image.clone();
        f(&mut img);
        let path = dir.path(name);
        fs::write(&path, img).unwrap();
        path
    };

    // One superblock copy lost: still clean, with a warning.
    let one = damaged("one.img", &|img| img[..BLOCK].fill(0));
    let out = run_with(&pool_args(&one, &["check"]), None, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("warning: ") && stdout.contains("1 warning"),
        "{stdout}"
    );

    // Both copies with bad checksums: errors, exit 4, report on stdout.
    let bad = damaged("bad.img", &|img| {
        img[100] ^= 0xff;
        img[8 * BLOCK + 100] ^= 0xff;
    });
    let out = run_with(&pool_args(&bad, &["check"]), None, None);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        text(&out.stdout).contains("error: "),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("both superblock copies are damaged"));
    let err = fails_with(4, &pool_args(&bad, &["check", "--json"]), None);
    assert!(err.contains("check found 1 error"), "{err}");
    let j = J::parse(&text(
        &run_with(&pool_args(&bad, &["check", "--json"]), None, None).stdout,
    ));
    assert_eq!(j.at("clean"), &J::Bool(false));
    // Other commands refuse the damaged pool with the same reason.
    let err = fails(&bad, &["list"]);
    assert!(err.contains("both superblock copies are damaged"), "{err}");

    // Both copies zeroed: the pool's other records still identify it.
    let zeroed = damaged("zeroed.img", &|img| {
        img[..BLOCK].fill(0);
        img[8 * BLOCK..9 * BLOCK].fill(0);
    });
    let out = run_with(&pool_args(&zeroed, &["check"]), None, None);
    assert_eq!(out.status.code(), Some(4));
    let report = text(&out.stdout) + &text(&out.stderr);
    assert!(report.contains("superblock copies are missing"), "{report}");
    // A file that never was a pool.
    let plain = dir.path("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let err = fails_with(8, &pool_args(&plain, &["check"]), None);
    assert!(err.contains("not a thinlun pool"), "{err}");
    let err = fails_with(8, &pool_args(&dir.path("missing.img"), &["check"]), None);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn help_and_broken_pipe() {
    let out = run_with(&["--help"], None, None);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in [
        "pool",
        "check",
        "create",
        "list",
        "info",
        "resize",
        "rename",
        "remove",
        "import",
        "export",
        "THINLUN_POOL",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }

    // A reader that goes away early must not make thinctl panic.
    let dir = TempDir::new("pipe");
    let pool = new_pool(&dir);
    ok(&pool, &["create", "big", "32M"]);
    let mut child = Command::new(BIN)
        .args(pool_args(&pool, &["export", "big", "-"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn space_policy_trim_and_grow() {
    let dir = TempDir::new("space");
    let pool = new_pool(&dir);
    let out = ok(
        &pool,
        &[
            "pool",
            "set",
            "--data-thresholds",
            "50,70",
            "--when-full",
            "queue",
            "--queue-timeout",
            "3",
            "--max-overcommit",
            "2",
        ],
    );
    assert!(
        out.contains("queue writes up to 3 s") && out.contains("2.00x"),
        "{out}"
    );
    let data_bytes = J::parse(&ok(&pool, &["pool", "status", "--json"])).num("data_bytes") as u64;
    let big = format!("{}", data_bytes / 4096 * 4096);
    ok(&pool, &["create", "a", &big]);
    ok(&pool, &["create", "b", &big]);
    let e = fails(&pool, &["create", "c", "1M"]);
    assert!(e.contains("overcommit") && e.contains("--force"), "{e}");
    ok(&pool, &["create", "c", "1M", "--force"]);
    // Fill past both thresholds; status shows them crossed.
    let img = dir.path("fill.raw");
    fs::write(
        &img,
        vec![0x5au8; (data_bytes as usize) * 3 / 4 / BLOCK * BLOCK],
    )
    .unwrap();
    ok(&pool, &["import", "a", img.to_str().unwrap()]);
    let st = ok(&pool, &["pool", "status"]);
    assert!(
        st.contains("thresholds crossed:   data 50%, data 70%"),
        "{st}"
    );
    // Space freed by removal goes back to the file system with trim.
    ok(&pool, &["remove", "a"]);
    let trimmed = ok(&pool, &["trim"]);
    assert!(trimmed.contains("released"), "{trimmed}");
    // Grow after the file grew; refused when there is nothing to grow.
    let e = fails(&pool, &["pool", "grow"]);
    assert!(e.contains("nothing to grow"), "{e}");
    fs::OpenOptions::new()
        .write(true)
        .open(&pool)
        .unwrap()
        .set_len(128 * MIB as u64)
        .unwrap();
    let grown = ok(&pool, &["pool", "grow"]);
    assert!(grown.contains("to 128M"), "{grown}");
    for bad in [
        vec!["pool", "set", "--data-thresholds", "90,80"],
        vec!["pool", "set", "--when-full", "sometimes"],
        vec!["pool", "set", "--max-overcommit", "0.5"],
    ] {
        let out = run_with(&pool_args(&pool, &bad), None, None);
        assert!(
            !out.status.success() && !text(&out.stderr).contains("panicked"),
            "{bad:?}"
        );
    }
}

/// `pool create` names what a file already holds and refuses to overwrite
/// it without `--force`, as pvcreate, wipefs and zpool create do. The
/// images are made by the real tools.
#[test]
fn pool_create_refuses_foreign_data_without_force() {
    let dir = TempDir::new("foreign");
    let make = |name: &str, tool: &str, args: &[&str]| -> Option<PathBuf> {
        let p = dir.path(name);
        fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
        let mut cmd = Command::new(tool);
        cmd.args(args)
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match cmd.status() {
            Ok(s) if s.success() => Some(p),
            // The tool is missing here: nothing to check with it.
            _ => {
                eprintln!("{tool} unavailable: skipping its image");
                None
            }
        }
    };
    let qcow2 = dir.path("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("64M")
        .status()
        .is_ok_and(|s| s.success());
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();
    if made {
        cases.push((qcow2, "a qcow2 disk image"));
    }
    if let Some(p) = make("ext4.img", "mkfs.ext4", &["-q", "-F"]) {
        cases.push((p, "a file system (ext4)"));
    }
    if let Some(p) = make("swap.img", "mkswap", &[]) {
        cases.push((p, "swap space"));
    }
    let random = dir.path("random.img");
    let mut bytes = vec![0u8; 1 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
    fs::write(&random, &bytes).unwrap();
    cases.push((random, "data that no probe recognises"));
    // A partition table written by sfdisk, where it is installed.
    let gpt = dir.path("gpt.img");
    fs::File::create(&gpt).unwrap().set_len(64 << 20).unwrap();
    let sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&gpt)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"label: gpt\n,\n")?;
            c.wait()
        });
    if sfdisk.is_ok_and(|s| s.success()) {
        cases.push((gpt, "a partition table (gpt)"));
    } else {
        eprintln!("sfdisk unavailable: skipping the partition table");
    }
    for (path, what) in &cases {
        let before = fs::read(path).unwrap();
        let e = fails(path, &["pool", "create", "--size", "64M"]);
        assert!(e.contains(what) && e.contains("--force"), "{e}");
        assert_eq!(&fs::read(path).unwrap(), &before, "{what} was changed");
    }
    // A previous thinlun pool is named by the engine.
    let pool = new_pool(&dir);
    let e = fails(&pool, &["pool", "create", "--size", "64M"]);
    assert!(e.contains("already holds a thinlun pool"), "{e}");
    // Zeros (a new sparse file) need no --force; --force overwrites.
    let zeros = dir.path("zeros.img");
    fs::File::create(&zeros).unwrap().set_len(64 << 20).unwrap();
    ok(&zeros, &["pool", "create", "--size", "64M"]);
    let (path, _) = &cases[0];
    ok(path, &["pool", "create", "--size", "64M", "--force"]);
    ok(path, &["pool", "status"]);
}

/// Commands that change a pool wait for one another, as LVM commands wait
/// on their lock: ten concurrent snapshots and creates all succeed, a
/// command that finds the pool held says once that it waits, and
/// `--no-wait` fails at once.
#[test]
fn concurrent_writers_wait_for_the_pool() {
    let dir = TempDir::new("wait");
    let pool = new_pool(&dir);
    ok(&pool, &["create", "vm", "8M"]);
    let p = pool.to_str().unwrap();
    let children: Vec<_> = (0..10)
        .flat_map(|i| {
            let snap = format!("vm@s{i}");
            let vol = format!("v{i}");
            [
                ["-p", p, "snapshot", &snap]
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                ["-p", p, "create", &vol, "1M"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ]
        })
        .map(|args| {
            Command::new(BIN)
                .args(&args)
                .env_remove("THINLUN_POOL")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let list = ok(&pool, &["list"]);
    for i in 0..10 {
        assert!(
            list.contains(&format!("vm@s{i}")) && list.contains(&format!("v{i} ")),
            "{list}"
        );
    }

    // An import from a pipe holds the pool until its input ends.
    let mut holder = Command::new(BIN)
        .args(["-p", p, "import", "held", "-", "--size", "1M"])
        .env_remove("THINLUN_POOL")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = holder.stdin.take().unwrap();
    input.write_all(&[1u8; BLOCK]).unwrap();
    // Wait until it has the pool: a --no-wait command is refused then.
    let mut refused = String::new();
    for i in 0..200 {
        // Until the import has it, these go through (each under a new name).
        let name = format!("probe{i}");
        let out = run_with(
            &pool_args(&pool, &["--no-wait", "create", &name, "1M"]),
            None,
            None,
        );
        if !out.status.success() {
            refused = text(&out.stderr);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        refused.contains("open for writing by another"),
        "{refused:?}"
    );
    assert!(!refused.contains("waiting"), "{refused:?}");
    // A waiting command says so once, and goes ahead when the pool is free.
    let waiter = Command::new(BIN)
        .args(["-p", p, "create", "after", "1M"])
        .env_remove("THINLUN_POOL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(input);
    assert!(holder.wait().unwrap().success());
    let out = waiter.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("waiting up to 60 s").count(), 1, "{stderr}");
}

/// `export VOL -` with stdout redirected to a regular file leaves holes
/// where the volume has none, as `export VOL FILE` does; through a pipe
/// the bytes are the same.
#[test]
fn export_to_stdout_redirected_to_a_file_is_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("sparse-stdout");
    let pool = new_pool(&dir);
    ok(&pool, &["create", "vm", "32M"]);
    let data = dir.path("data.bin");
    fs::write(&data, vec![0x5au8; MIB]).unwrap();
    ok(&pool, &["import", "vm", data.to_str().unwrap()]);
    let out = dir.path("out.raw");
    let status = Command::new(BIN)
        .args(["-p", pool.to_str().unwrap(), "export", "vm", "-"])
        .env_remove("THINLUN_POOL")
        .stdout(fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 32 * MIB as u64);
    let allocated = meta.blocks() * 512;
    assert!(
        allocated <= 2 * MIB as u64,
        "{allocated} bytes allocated for 1 MiB of data"
    );
    let piped = run_with(&pool_args(&pool, &["export", "vm", "-"]), None, None);
    assert!(piped.status.success());
    assert_eq!(fs::read(&out).unwrap(), piped.stdout);
}

/// Usage errors exit 2 (as clap's own do), runtime errors 1, and neither
/// carries an errno-style prefix.
#[test]
fn usage_errors_exit_2_and_runtime_errors_1() {
    let dir = TempDir::new("exit-codes");
    let pool = new_pool(&dir);
    let p = pool.to_str().unwrap();
    let e = fails_with(2, &["-p", p, "create", "x", "-5G"], None);
    assert!(e.contains("sizes cannot be negative"), "{e}");
    let e = fails_with(2, &["-p", p, "create", "x", "12Q"], None);
    assert!(e.contains("unknown unit"), "{e}");
    let e = fails_with(2, &["-p", p, "create", "a/b", "1M"], None);
    assert!(e.contains("invalid volume name"), "{e}");
    let e = fails_with(2, &["list"], None);
    assert!(e.contains("no pool given"), "{e}");
    // A refusal that depends on the pool is a runtime error, worded
    // without an errno-style prefix.
    ok(&pool, &["create", "y", "8M"]);
    let e = fails_with(1, &["-p", p, "resize", "y", "4M"], None);
    assert!(
        e.contains("use --force") && !e.contains("invalid argument:"),
        "{e}"
    );
    let e = fails_with(1, &["-p", p, "remove", "missing"], None);
    assert!(e.contains("not found"), "{e}");
}

/// stderr of a successful run.
fn ok_stderr(pool: &Path, args: &[&str]) -> String {
    let out = run_with(&pool_args(pool, args), None, None);
    assert!(
        out.status.success(),
        "thinctl {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stderr)
}

/// Issue 17 item 4 and 12: import says what it wrote and newly
/// allocated, and a failed import says what it left behind.
#[test]
fn import_reports_what_it_wrote_and_what_a_failure_left() {
    let dir = TempDir::new("import-report");
    let pool = dir.path("pool.img");
    ok(
        &pool,
        &["pool", "create", "--size", "16M", "--chunk-size", "64K"],
    );
    // 1 MiB of data, then 2 MiB of zeros.
    let mut img = vec![0u8; 3 * MIB];
    for (i, b) in img[..MIB].iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let src = dir.path("one.raw");
    fs::write(&src, &img).unwrap();
    let out = ok(&pool, &["import", "a", src.to_str().unwrap()]);
    assert!(
        out.contains("into the new volume 'a'")
            && out.contains("1.0M of data written")
            && out.contains("2.0M of zero blocks")
            && out.contains("1.0M newly allocated"),
        "{out}"
    );
    // Overwriting one block of it: the volume's total mapped space (1.0M)
    // is not what this import allocated.
    let block = dir.path("block.raw");
    fs::write(&block, vec![0x5au8; BLOCK]).unwrap();
    let out = ok(&pool, &["import", "a", block.to_str().unwrap()]);
    assert!(
        out.contains("into volume 'a'") && out.contains("4.0K of data written"),
        "{out}"
    );
    assert!(!out.contains("1.0M"), "{out}");

    // 40 MiB of data on an 11 MiB data area runs out of space.
    let big = dir.path("big.raw");
    fs::write(&big, vec![0x77u8; 40 * MIB]).unwrap();
    let e = fails(&pool, &["import", "new", big.to_str().unwrap()]);
    assert!(
        e.contains("out of data space") && e.contains("'new' this import created was removed"),
        "{e}"
    );
    assert!(!ok(&pool, &["list", "-H", "-o", "name"]).contains("new"));
    ok(&pool, &["create", "old", "40M"]);
    let e = fails(&pool, &["import", "old", big.to_str().unwrap()]);
    assert!(
        e.contains("the existing volume 'old' now holds the first")
            && e.contains("big.raw and perhaps part of the next MiB"),
        "{e}"
    );
}

/// Issue 17 item 6: usage errors exit 2 and name the problem in words.
#[test]
fn policy_usage_errors_exit_2_in_words() {
    let dir = TempDir::new("policy-usage");
    let pool = new_pool(&dir);
    let p = pool.to_str().unwrap();
    let e = fails_with(
        2,
        &["-p", p, "pool", "set", "--data-thresholds", "95,80"],
        None,
    );
    assert!(e.contains("must increase") && !e.contains('['), "{e}");
    let e = fails_with(2, &["-p", p, "pool", "set", "--when-full", "wait"], None);
    assert!(e.contains("error") && e.contains("queue"), "{e}");
    let e = fails_with(
        2,
        &["-p", p, "pool", "set", "--max-overcommit", "lots"],
        None,
    );
    assert!(e.contains("ratio"), "{e}");
    let e = fails_with(2, &["-p", p, "resize", "x", "+1Q"], None);
    assert!(e.contains("unknown unit"), "{e}");
    let out = ok(&pool, &["pool", "set", "--data-thresholds", "70,85"]);
    assert!(out.contains("data warnings at 70%, 85%,"), "{out}");
}

/// A pool with a volume and its snapshot, a base image and its clone.
fn family_pool(dir: &TempDir) -> PathBuf {
    let pool = new_pool(dir);
    ok(&pool, &["create", "vm", "8M"]);
    ok(&pool, &["snapshot", "vm@s-b"]);
    // A second later, so creation times differ; named to sort before s-b.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    ok(&pool, &["snapshot", "vm@s-a"]);
    ok(&pool, &["create", "tmpl", "4M"]);
    ok(&pool, &["base", "tmpl"]);
    ok(&pool, &["clone", "tmpl", "cl"]);
    pool
}

/// Issue 17 item 7: pool status, list and check count the same volumes
/// (vm, tmpl, cl) and snapshots (vm@s-a, vm@s-b).
#[test]
fn one_count_of_volumes_everywhere() {
    let dir = TempDir::new("counts");
    let pool = family_pool(&dir);
    let status = ok(&pool, &["pool", "status"]);
    let line = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .to_string()
    };
    assert!(
        line("volumes:").contains("3 (of them 1 base image, 1 linked clone)"),
        "{status}"
    );
    assert!(line("snapshots:").ends_with(" 2"), "{status}");
    let j = J::parse(&ok(&pool, &["pool", "status", "--json"]));
    assert_eq!((j.num("volumes"), j.num("snapshots")), (3.0, 2.0));
    let listed = |t: &str| ok(&pool, &["list", "-H", "-t", t, "-o", "name"]);
    assert_eq!(listed("volume").lines().count(), 3);
    assert_eq!(listed("snapshot").lines().count(), 2);
    assert_eq!(listed("all").lines().count(), 5);
    let check = ok(&pool, &["check"]);
    assert!(check.contains("3 volumes and 2 snapshots"), "{check}");
    let j = J::parse(&ok(&pool, &["check", "--json"]));
    assert_eq!((j.num("volumes"), j.num("snapshots")), (3.0, 2.0));
}

/// Issue 17 item 8: -H, -o, --bytes, -t, creation times, and --json
/// before the command.
#[test]
fn output_for_scripts() {
    let dir = TempDir::new("scripts");
    let pool = family_pool(&dir);
    // Snapshots by creation time, not by name.
    assert_eq!(
        ok(&pool, &["list", "-H", "-t", "snapshot", "-o", "name"]),
        "vm@s-b\nvm@s-a\n"
    );
    let out = ok(
        &pool,
        &[
            "list",
            "-H",
            "-o",
            "name,size,created",
            "--bytes",
            "-t",
            "base",
        ],
    );
    let cells: Vec<&str> = out.trim_end().split('\t').collect();
    assert_eq!(cells[..2], ["tmpl", "4194304"], "{out}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let created: u64 = cells[2].parse().unwrap();
    assert!(created <= now && created + 600 > now, "{out}");
    // People get a header, aligned columns and dates.
    let out = ok(&pool, &["list", "-o", "name,created"]);
    assert!(out.starts_with("NAME") && out.contains("UTC"), "{out}");
    let e = fails_with(
        2,
        &["-p", pool.to_str().unwrap(), "list", "-o", "name,bogus"],
        None,
    );
    assert!(
        e.contains("unknown field 'bogus'") && e.contains("mapped"),
        "{e}"
    );
    assert_eq!(
        ok(&pool, &["info", "vm", "-H", "-o", "size,mapped", "--bytes"]),
        "8388608\t0\n"
    );
    let out = ok(&pool, &["du", "-H", "--bytes", "-o", "name,provisioned"]);
    assert!(out.lines().any(|l| l == "vm\t8388608"), "{out}");
    assert!(!out.contains("pool data used"), "{out}");
    // --json before the command is the same as after it.
    let before = run_with(
        &["--json", "-p", pool.to_str().unwrap(), "list"],
        None,
        None,
    );
    assert!(before.status.success());
    assert_eq!(text(&before.stdout), ok(&pool, &["list", "--json"]));
    J::parse(&text(&before.stdout));
    // A command without a JSON form refuses it.
    fails_with(
        2,
        &["-p", pool.to_str().unwrap(), "--json", "rename", "vm", "x"],
        None,
    );
}

/// Issue 17 item 9: relative resizes, errors in units, and a warning when
/// the volumes provision more than the pool holds.
#[test]
fn resize_relative_and_overcommit_in_units() {
    let dir = TempDir::new("resize-relative");
    let pool = new_pool(&dir);
    ok(&pool, &["create", "v", "8M"]);
    let out = ok(&pool, &["resize", "v", "+4M"]);
    assert!(out.contains("from 8.0M to 12M"), "{out}");
    let e = fails(&pool, &["resize", "v", "-4M"]);
    assert!(
        e.contains("from 12 MiB to 8.0 MiB") && e.contains("--force"),
        "{e}"
    );
    let out = ok(&pool, &["resize", "v", "-4M", "--force"]);
    assert!(out.contains("from 12M to 8.0M"), "{out}");
    let e = fails(&pool, &["resize", "v", "-8M", "--force"]);
    assert!(e.contains("cannot shrink by 8.0M"), "{e}");
    // lvcreate warns when thin volumes add up to more than the pool.
    let warn = ok_stderr(&pool, &["create", "huge", "1E"]);
    assert!(
        warn.contains("warning") && warn.contains("overcommitted"),
        "{warn}"
    );
    let warn = ok_stderr(&pool, &["create", "small", "4M"]);
    assert!(
        warn.contains("overcommitted"),
        "still overcommitted: {warn}"
    );
    ok(&pool, &["remove", "huge"]);
    assert_eq!(ok_stderr(&pool, &["resize", "small", "+4M"]), "");
    // The limit's refusal in units, not byte counts.
    ok(&pool, &["pool", "set", "--max-overcommit", "1"]);
    let e = fails(&pool, &["create", "big", "1G"]);
    assert!(
        e.contains("1.0 GiB") && e.contains("overcommit limit"),
        "{e}"
    );
    assert!(!e.contains("bytes"), "{e}");
}
