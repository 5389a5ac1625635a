//! `thinctl` on a pool with a damaged mapping-tree node (issue 19). With
//! one copy bad, its twin covers it and `repair` rewrites it. With both
//! bad, the pool still opens, `list` shows every volume and flags the damaged one,
//! `check` names it and the range it lost (exit 4), and every other volume
//! exports and takes snapshots as before.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{ok, run, text, JExt, TempDir, J};

const BLOCK: usize = 4096;

fn thinctl(pool: &Path, args: &[&str]) -> Output {
    run(pool, args, None)
}

/// Runs and expects exit `code`; returns (stdout, stderr).
fn expect(code: i32, pool: &Path, args: &[&str]) -> (String, String) {
    let out = thinctl(pool, args);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "thinctl {args:?}: {o}{e}");
    assert!(!e.contains("panicked"), "{e}");
    (o, e)
}

fn export(dir: &TempDir, pool: &Path, name: &str) -> Vec<u8> {
    let f = dir.path(&format!("{name}.out"));
    let _ = fs::remove_file(&f);
    ok(pool, &["export", name, f.to_str().unwrap()]);
    fs::read(&f).unwrap()
}

/// What `names` hold now, through `thinctl export`.
fn exports<'a>(dir: &TempDir, pool: &Path, names: &[&'a str]) -> Vec<(&'a str, Vec<u8>)> {
    names.iter().map(|&n| (n, export(dir, pool, n))).collect()
}

/// The blocks of both copies of a volume's tree root, from a `thinctl dump`.
fn root_of(dump: &J, full_name: &str) -> (usize, usize) {
    let on_disk = dump
        .at("volumes")
        .arr()
        .iter()
        .find(|v| v.str("full_name") == full_name)
        .unwrap_or_else(|| panic!("{full_name} not in the dump"))
        .at("on_disk");
    let copies = (
        on_disk.num("root") as usize,
        on_disk.num("root_twin") as usize,
    );
    assert!(copies.1 != 0, "new pools have ditto nodes: {copies:?}");
    copies
}

/// Flips one bit in each of `blocks` of the pool file.
fn flip_bits(pool: &Path, blocks: &[usize]) -> Vec<u8> {
    let mut img = fs::read(pool).unwrap();
    for &b in blocks {
        img[b * BLOCK + 70] ^= 0x20;
    }
    fs::write(pool, &img).unwrap();
    img
}

/// vm-1 with its snapshot and a clone of that, and an unrelated vm-2;
/// vm-1 then changes a block, so its tree (one leaf) is its own.
fn sample_pool(dir: &TempDir) -> PathBuf {
    let pool = dir.path("pool.img");
    ok(
        &pool,
        &["pool", "create", "--size", "64M", "--chunk-size", "64K"],
    );
    for (name, seed) in [("vm-1", 1u8), ("vm-2", 2)] {
        ok(&pool, &["create", name, "4M"]);
        let data: Vec<u8> = (0..2 << 20)
            .map(|i: usize| (i / BLOCK) as u8 ^ seed | 1)
            .collect();
        let src = dir.path("src.raw");
        fs::write(&src, &data).unwrap();
        ok(&pool, &["import", name, src.to_str().unwrap()]);
    }
    ok(&pool, &["snapshot", "vm-1@s1"]);
    ok(&pool, &["clone", "vm-1@s1", "clone-1"]);
    let one = dir.path("one.raw");
    fs::write(&one, vec![0xabu8; BLOCK]).unwrap();
    ok(&pool, &["import", "vm-1", one.to_str().unwrap()]);
    pool
}

#[test]
fn list_check_and_export_on_a_pool_with_a_damaged_node() {
    let dir = TempDir::new("damaged-node");
    let pool = sample_pool(&dir);
    let before = exports(&dir, &pool, &["vm-2", "vm-1@s1", "clone-1"]);
    let d = J::parse(&ok(&pool, &["dump"]));
    let (root, twin) = root_of(&d, "vm-1");
    let shared_root = d
        .at("volumes")
        .arr()
        .iter()
        .filter(|v| v.str("full_name") != "vm-1")
        .any(|v| v.at("on_disk").num("root") as usize == root);
    assert!(!shared_root);
    // One flipped bit in each copy of vm-1's root node.
    flip_bits(&pool, &[root, twin]);

    let (out, err) = expect(0, &pool, &["list"]);
    for name in ["vm-1", "vm-2", "s1", "clone-1"] {
        assert!(out.contains(name), "{out}");
    }
    for line in out.lines().skip(1) {
        let damaged = line.contains("damaged");
        assert_eq!(damaged, line.starts_with("vm-1 "), "{out}");
    }
    assert!(err.contains("1 volume is damaged"), "{err}");
    let (out, _) = expect(0, &pool, &["list", "--json"]);
    let j = J::parse(&out);
    for v in j.arr() {
        assert_eq!(v.at("damaged"), &J::Bool(v.str("name") == "vm-1"), "{out}");
    }
    let (out, _) = expect(0, &pool, &["info", "vm-1"]);
    assert!(
        out.contains("sectors 0..8192 (bytes 0..4194304) unreadable"),
        "{out}"
    );

    let (out, err) = expect(4, &pool, &["check"]);
    assert!(
        out.contains("volume 'vm-1' is damaged: it cannot map sectors 0..8192 (bytes 0..4194304")
            && out.contains(&format!("mapping node at block {root}")),
        "{out}"
    );
    assert_eq!(out.matches("is damaged").count(), 1, "{out}");
    assert!(err.contains("check found 1 error"), "{err}");
    let (out, _) = expect(4, &pool, &["check", "--json"]);
    let j = J::parse(&out);
    let dmg = j.at("damaged").arr();
    assert_eq!(dmg.len(), 1, "{out}");
    assert_eq!(dmg[0].str("volume"), "vm-1");
    assert_eq!(dmg[0].num("end_sector") as u64, 8192);
    assert_eq!(dmg[0].num("end_byte") as u64, 4 << 20);

    // Everything else works as before.
    for (name, data) in &before {
        assert!(
            &export(&dir, &pool, name) == data,
            "{name} exports differently"
        );
    }
    let f = dir.path("vm-1.out");
    let (_, err) = expect(1, &pool, &["export", "vm-1", f.to_str().unwrap()]);
    assert!(err.contains("damaged"), "{err}");
    ok(&pool, &["snapshot", "vm-2@after"]);
    let (_, err) = expect(1, &pool, &["snapshot", "vm-1@after"]);
    assert!(err.contains("damaged"), "{err}");
    let (_, err) = expect(1, &pool, &["remove", "vm-1", "--recursive"]);
    assert!(err.contains("damaged"), "{err}");
    // Repair cannot guess what the node held, and writes nothing.
    let img = fs::read(&pool).unwrap();
    let (out, _) = expect(4, &pool, &["repair"]);
    assert!(out.contains("volume 'vm-1' is damaged"), "{out}");
    assert!(fs::read(&pool).unwrap() == img);
    let (out, _) = expect(4, &pool, &["check"]);
    assert_eq!(out.matches("is damaged").count(), 1, "{out}");
}

#[test]
fn repair_salvage_rebuilds_the_damaged_volume() {
    let dir = TempDir::new("salvage-node");
    let pool = sample_pool(&dir);
    let before = exports(&dir, &pool, &["vm-2", "vm-1@s1", "clone-1"]);
    let d = J::parse(&ok(&pool, &["dump"]));
    let (root, twin) = root_of(&d, "vm-1");
    let img = flip_bits(&pool, &[root, twin]);

    // Never implicit: plain repair refuses and says how to salvage.
    let (out, _) = expect(4, &pool, &["repair"]);
    assert!(out.contains("'thinctl repair --salvage vm-1'"), "{out}");
    // A volume that is not damaged, or does not exist: refused.
    for name in ["vm-2", "nope"] {
        let (out, err) = expect(4, &pool, &["repair", "--salvage", name]);
        assert!(out.contains("error: "), "{out}");
        assert!(err.contains("nothing was written"), "{err}");
    }
    let (out, _) = expect(0, &pool, &["repair", "--salvage", "vm-1", "--dry-run"]);
    assert!(
        out.contains("would salvage 'vm-1': sectors 0..8192"),
        "{out}"
    );
    let (out, _) = expect(0, &pool, &["repair", "--salvage", "vm-1", "-n", "--json"]);
    let j = J::parse(&out);
    let s = &j.at("salvaged").arr()[0];
    assert_eq!(s.str("volume"), "vm-1");
    let z = &s.at("zeroed").arr()[0];
    assert_eq!(z.num("end_sector") as u64, 8192, "{out}");
    assert_eq!(z.num("end_byte") as u64, 4 << 20, "{out}");
    assert_eq!(z.num("node_block") as usize, root, "{out}");
    assert!(fs::read(&pool).unwrap() == img, "a dry run writes nothing");

    let (out, err) = expect(1, &pool, &["repair", "--salvage", "vm-1"]);
    assert!(
        out.contains(
            "salvaged 'vm-1': sectors 0..8192 (bytes 0..4194304, 4.0 MiB) now read as zeros; lost with mapping node at block"
        ) && out.contains(&format!("block {root}")),
        "{out}"
    );
    assert!(out.contains("check is clean"), "{out}{err}");

    ok(&pool, &["check"]);
    let (out, err) = expect(0, &pool, &["list"]);
    assert!(
        !out.contains("damaged") && !err.contains("damaged"),
        "{out}{err}"
    );
    assert!(export(&dir, &pool, "vm-1") == vec![0u8; 4 << 20]);
    for (name, data) in &before {
        assert!(&export(&dir, &pool, name) == data, "{name} changed");
    }
    // Healthy: writes and snapshots.
    let one = dir.path("one.raw");
    fs::write(&one, vec![0xcdu8; BLOCK]).unwrap();
    ok(&pool, &["import", "vm-1", one.to_str().unwrap()]);
    ok(&pool, &["snapshot", "vm-1@after"]);
    assert_eq!(
        &export(&dir, &pool, "vm-1@after")[..BLOCK],
        &[0xcdu8; BLOCK][..]
    );
    ok(&pool, &["check"]);
}

/// One bad copy of a ditto node: nothing is damaged, `check` warns and
/// names the copy, `repair` rewrites it from its twin; for either copy.
#[test]
fn one_bad_copy_of_a_node_is_covered_by_its_twin_and_repaired() {
    let dir = TempDir::new("ditto-node");
    let pool = sample_pool(&dir);
    let names = ["vm-1", "vm-2", "vm-1@s1", "clone-1"];
    let before = exports(&dir, &pool, &names);
    let (root, twin) = root_of(&J::parse(&ok(&pool, &["dump"])), "vm-1");
    let good = fs::read(&pool).unwrap();
    for (bad, other) in [(twin, root), (root, twin)] {
        flip_bits(&pool, &[bad]);
        let (out, _) = expect(0, &pool, &["list"]);
        assert!(!out.contains("damaged"), "{out}");
        let (out, err) = expect(0, &pool, &["check"]);
        assert!(
            out.contains(&format!("damaged copy of a mapping node at block {bad}"))
                && out.contains(&format!("using its twin at block {other}"))
                && out.contains("clean, 1 warning"),
            "{out}{err}"
        );
        for (name, data) in &before {
            assert!(
                &export(&dir, &pool, name) == data,
                "{name} with block {bad} bad"
            );
        }
        // Exit 1 as fsck's: errors were corrected.
        let (out, err) = expect(1, &pool, &["repair"]);
        assert!(
            out.contains(&format!("mapping node copy at block {bad} is damaged"))
                && out.contains(&format!("rewritten from its twin at block {other}"))
                && out.contains("repaired (1 block written); check is clean"),
            "{out}{err}"
        );
        let fixed = fs::read(&pool).unwrap();
        let block = |img: &[u8], b: usize| img[b * BLOCK..(b + 1) * BLOCK].to_vec();
        assert!(
            block(&fixed, bad) == block(&good, bad),
            "block {bad} is as written"
        );
        let (out, _) = expect(0, &pool, &["check"]);
        assert!(out.contains(": clean\n"), "{out}");
    }
}
