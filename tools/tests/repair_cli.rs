//! End-to-end tests of `thinctl repair`, `check --repair`, `check
//! --read-only`, `dump` and `restore` against real pool files, damaged by
//! flipping bytes and zeroing blocks the way a bad disk or a human would.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{ok, run, text, JExt, TempDir, BIN, J};

const BLOCK: usize = 4096;

fn thinctl(pool: &Path, args: &[&str]) -> Output {
    run(pool, args, None)
}

/// Runs and expects exit `code`; returns stdout + stderr.
fn expect(code: i32, pool: &Path, args: &[&str]) -> String {
    let out = thinctl(pool, args);
    let all = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "thinctl {args:?}: {all}");
    assert!(!all.contains("panicked"), "{all}");
    all
}

/// `check` is clean: exit 0, no warning, no error.
fn assert_clean(pool: &Path) {
    let out = expect(0, pool, &["check"]);
    assert!(
        out.trim_end().ends_with(": clean") && !out.contains("warning"),
        "{out}"
    );
}

fn u64_at(img: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
}

/// A pool with a volume holding data, a snapshot, and a clone that
/// changed one block.
fn sample_pool(dir: &TempDir) -> PathBuf {
    let pool = dir.path("pool.img");
    ok(
        &pool,
        &["pool", "create", "--size", "64M", "--chunk-size", "64K"],
    );
    ok(&pool, &["create", "vm-1", "4M"]);
    let mut data = vec![0u8; 2 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        // Non-zero in every block, different per block, never a magic.
        *b = (i / BLOCK) as u8 | 1;
    }
    data[BLOCK * 100..BLOCK * 110].fill(0);
    let src = dir.path("src.raw");
    fs::write(&src, &data).unwrap();
    ok(&pool, &["import", "vm-1", src.to_str().unwrap()]);
    ok(&pool, &["snapshot", "vm-1@s1"]);
    ok(&pool, &["clone", "vm-1@s1", "clone-1"]);
    let one = dir.path("one.raw");
    fs::write(&one, vec![0xabu8; BLOCK]).unwrap();
    ok(&pool, &["import", "vm-1", one.to_str().unwrap()]);
    pool
}

/// Every volume's contents, read through `thinctl export`.
fn contents(dir: &TempDir, pool: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in ["vm-1", "vm-1@s1", "clone-1"] {
        let f = dir.path(&format!("{name}.out"));
        let _ = fs::remove_file(&f);
        ok(pool, &["export", name, f.to_str().unwrap()]);
        out.push((name.to_string(), fs::read(&f).unwrap()));
    }
    out
}

/// The dump parsed, for looking up where records are.
fn dump_json(pool: &Path) -> J {
    J::parse(&ok(pool, &["dump"]))
}

fn volume<'a>(d: &'a J, full_name: &str) -> &'a J {
    d.at("volumes")
        .arr()
        .iter()
        .find(|v| v.str("full_name") == full_name)
        .unwrap_or_else(|| panic!("no volume {full_name}"))
}

/// (name, damage done to the pool image, words the report must contain)
type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, &'static str);

fn damaged(dir: &TempDir, image: &[u8], name: &str, f: &dyn Fn(&mut Vec<u8>)) -> PathBuf {
    let mut img = image.to_vec();
    f(&mut img);
    let p = dir.path(name);
    fs::write(&p, img).unwrap();
    p
}

#[test]
fn repair_restores_twin_copies_and_torn_journal_tail() {
    let dir = TempDir::new("repair-twins");
    let pool = sample_pool(&dir);
    let want = contents(&dir, &pool);
    let d = dump_json(&pool);
    let header_a = volume(&d, "vm-1").at("on_disk").at("header_blocks").arr()[0]
        .as_f64()
        .expect("a number") as usize;
    let image = fs::read(&pool).unwrap();
    // Host 1's journal: its region starts at journal_start (superblock
    // offset 112); the valid checkpoint copy with the higher generation says
    // where the journal ends after a clean close.
    let journal_start = u64_at(&image, 112) as usize;
    let ck = |k: usize| {
        let at = (journal_start + k) * BLOCK;
        (
            u64_at(&image, at + 24),
            u32::from_le_bytes(image[at + 32..at + 36].try_into().unwrap()),
        )
    };
    let head = if ck(1).0 > ck(0).0 { ck(1).1 } else { ck(0).1 } as usize;
    let tail_block = journal_start + 2 + head;

    let cases: Vec<Case> = vec![
        (
            "sb-b-flipped",
            Box::new(|img: &mut Vec<u8>| img[8 * BLOCK + 300] ^= 0x10),
            "superblock copy at block 8",
        ),
        (
            "sb-a-zeroed",
            Box::new(|img: &mut Vec<u8>| img[..BLOCK].fill(0)),
            "superblock copy at block 0 is damaged or missing",
        ),
        (
            "header-a-flipped",
            Box::new(move |img: &mut Vec<u8>| img[header_a * BLOCK + 40] ^= 0x01),
            "volume 'vm-1': header copy A",
        ),
        (
            "host-ckpt-flipped",
            Box::new(move |img: &mut Vec<u8>| img[journal_start * BLOCK + 33] ^= 0x80),
            "host 1: journal checkpoint copy",
        ),
        (
            "torn-tail",
            Box::new(move |img: &mut Vec<u8>| {
                // A journal block whose write was cut short: right magic and
                // version, contents that do not match the checksum.
                let at = tail_block * BLOCK;
                img[at..at + BLOCK].fill(0x3c);
                img[at..at + 8].copy_from_slice(b"TLJRNL\0\0");
                img[at + 8..at + 10].copy_from_slice(&1u16.to_le_bytes());
            }),
            "is torn",
        ),
    ];
    for (name, damage, fix) in &cases {
        let p = damaged(&dir, &image, &format!("{name}.img"), damage.as_ref());
        // check sees it as a warning: the pool is usable, exit 0.
        let out = expect(0, &p, &["check"]);
        assert!(out.contains("warning: "), "{name}: {out}");
        // A dry run says what it would fix, verified, and writes nothing.
        let before = fs::read(&p).unwrap();
        let out = expect(0, &p, &["repair", "--dry-run"]);
        assert!(
            out.contains("would fix: ") && out.contains(fix),
            "{name}: {out}"
        );
        assert!(fs::read(&p).unwrap() == before, "{name}: dry run wrote");
        // The repair: exit 1 (problems found and repaired), then clean.
        let args: &[&str] = if *name == "sb-a-zeroed" {
            &["check", "--repair"]
        } else {
            &["repair"]
        };
        let out = expect(1, &p, args);
        assert!(
            out.contains("fixed: ") && out.contains(fix),
            "{name}: {out}"
        );
        assert!(out.contains("check is clean"), "{name}: {out}");
        assert!(out.contains("free space and reference counts"), "{out}");
        assert_clean(&p);
        if *name == "torn-tail" {
            let img = fs::read(&p).unwrap();
            let at = tail_block * BLOCK;
            assert!(img[at..at + BLOCK].iter().all(|&b| b == 0));
        }
        // Nothing left to do; the data is what it was.
        let out = expect(0, &p, &["repair"]);
        assert!(out.contains("nothing to repair"), "{name}: {out}");
        assert_eq!(contents(&dir, &p), want, "{name}");
        fs::remove_file(&p).unwrap();
    }

    // JSON report.
    let p = damaged(&dir, &image, "json.img", &|img| img[8 * BLOCK + 300] ^= 1);
    let out = thinctl(&p, &["repair", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let j = J::parse(&text(&out.stdout));
    assert_eq!(j.at("repaired"), &J::Bool(true));
    assert_eq!(j.at("clean_after"), &J::Bool(true));
    assert_eq!(j.at("fixes").arr().len(), 1);
    assert_eq!(j.at("refused").arr().len(), 0);
    assert!(j.num("blocks_written") > 0.0);
}

#[test]
fn repair_refuses_what_needs_a_guess_and_writes_nothing() {
    let dir = TempDir::new("repair-refuse");
    let pool = sample_pool(&dir);
    let d = dump_json(&pool);
    let od = volume(&d, "clone-1").at("on_disk");
    let hb: Vec<usize> = od
        .at("header_blocks")
        .arr()
        .iter()
        .map(|h| h.as_f64().expect("a number") as usize)
        .collect();
    // vm-1's tree: find a leaf (level 0) by following its root.
    let image = fs::read(&pool).unwrap();
    let root = volume(&d, "vm-1").at("on_disk").num("root") as usize;
    let level = u16::from_le_bytes(
        image[root * BLOCK + 10..root * BLOCK + 12]
            .try_into()
            .unwrap(),
    );
    // Both copies (ditto nodes): the root's twin is in the dump, a child's
    // in its parent's 24-byte entry (key, child, child's twin).
    let (leaf, twin) = if level == 0 {
        let twin = volume(&d, "vm-1").at("on_disk").num("root_twin") as usize;
        (root, twin)
    } else {
        (
            u64_at(&image, root * BLOCK + 64 + 8) as usize,
            u64_at(&image, root * BLOCK + 64 + 16) as usize,
        )
    };
    assert!(twin != 0 && twin != leaf);

    let cases: Vec<Case> = vec![
        (
            "both-sb",
            Box::new(|img: &mut Vec<u8>| {
                img[300] ^= 1;
                img[8 * BLOCK + 300] ^= 1;
            }),
            "both superblock copies",
        ),
        (
            "both-headers",
            Box::new(move |img: &mut Vec<u8>| {
                img[hb[0] * BLOCK + 40] ^= 1;
                img[hb[1] * BLOCK + 40] ^= 1;
            }),
            "both copies are damaged",
        ),
        (
            "leaf-node",
            Box::new(move |img: &mut Vec<u8>| {
                img[leaf * BLOCK + 70] ^= 0x20;
                img[twin * BLOCK + 70] ^= 0x20;
            }),
            "mapping node",
        ),
        (
            "leaf-zeroed",
            Box::new(move |img: &mut Vec<u8>| {
                img[leaf * BLOCK..(leaf + 1) * BLOCK].fill(0);
                img[twin * BLOCK..(twin + 1) * BLOCK].fill(0);
            }),
            "mapping node",
        ),
    ];
    for (name, damage, why) in &cases {
        let p = damaged(&dir, &image, &format!("{name}.img"), damage.as_ref());
        let before = fs::read(&p).unwrap();
        let out = expect(4, &p, &["check"]);
        assert!(out.contains(why), "{name}: {out}");
        for args in [
            &["repair"][..],
            &["check", "--repair"],
            &["repair", "--dry-run"],
        ] {
            let out = expect(4, &p, args);
            assert!(
                out.contains("cannot be repaired without guessing")
                    && out.contains("nothing was written")
                    && out.contains(why),
                "{name} {args:?}: {out}"
            );
            assert!(fs::read(&p).unwrap() == before, "{name} {args:?} wrote");
        }
        let out = thinctl(&p, &["repair", "--json"]);
        assert_eq!(out.status.code(), Some(4));
        let j = J::parse(&text(&out.stdout));
        assert_eq!(j.at("repaired"), &J::Bool(false));
        assert!(!j.at("refused").arr().is_empty());
        assert!(fs::read(&p).unwrap() == before);
        fs::remove_file(&p).unwrap();
    }
    // Not a pool at all: the check cannot run (8).
    let plain = dir.path("plain.img");
    fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    expect(8, &plain, &["repair"]);
}

/// Kills the serving process this test started, even if the test fails.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_read_only_writes_nothing_beside_a_server_and_without_write_access() {
    let dir = TempDir::new("check-ro");
    let pool = sample_pool(&dir);
    let image = fs::read(&pool).unwrap();
    let mtime = fs::metadata(&pool).unwrap().modified().unwrap();
    for args in [
        &["check", "--read-only"][..],
        &["check", "-n", "--json"],
        &["dump"],
    ] {
        ok(&pool, args);
    }
    assert!(fs::read(&pool).unwrap() == image);
    assert_eq!(fs::metadata(&pool).unwrap().modified().unwrap(), mtime);
    expect(2, &pool, &["check", "--read-only", "--repair"]);

    // As an unprivileged user that may read but not write the file.
    let setpriv = Path::new("/usr/bin/setpriv");
    if setpriv.exists() {
        let run_as_nobody = |args: &[&str]| {
            Command::new(setpriv)
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    BIN,
                    "-p",
                ])
                .arg(&pool)
                .args(args)
                .env_remove("THINLUN_POOL")
                .output()
                .unwrap()
        };
        // The temp dir must be searchable by that user.
        let dir_ok = Command::new(setpriv)
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "test",
                "-r",
            ])
            .arg(&pool)
            .status()
            .is_ok_and(|s| s.success());
        if dir_ok {
            let out = run_as_nobody(&["check", "--read-only"]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            assert!(text(&out.stdout).contains("clean"));
            let out = run_as_nobody(&["repair"]);
            assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
        } else {
            eprintln!("skipping the unprivileged part: the temp dir is not readable by nobody");
        }
    }

    // While a server holds the pool open for writing.
    let sock = dir.path("vm.sock");
    let mut server = Server(
        Command::new(BIN)
            .env_remove("THINLUN_POOL")
            .arg("-p")
            .arg(&pool)
            .args(["serve", "clone-1", "--socket"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut up = false;
    for _ in 0..500 {
        if sock.exists() {
            up = true;
            break;
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("serve exited early: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(up, "serve did not create its socket");
    let out = expect(0, &pool, &["check", "--read-only"]);
    assert!(out.contains("clean"), "{out}");
    let out = expect(8, &pool, &["repair"]);
    assert!(out.contains("open for writing by another"), "{out}");
    // dump only reads, so it works beside the server; restore needs the
    // pool to itself.
    let dump_file = dir.path("served.json");
    ok(&pool, &["dump", "--output", dump_file.to_str().unwrap()]);
    let out = expect(
        1,
        &pool,
        &["restore", "--input", dump_file.to_str().unwrap(), "--force"],
    );
    assert!(out.contains("open for writing by another"), "{out}");
    drop(server);
}

#[test]
fn dump_restore_onto_wiped_metadata_gives_back_the_data() {
    let dir = TempDir::new("dump-restore");
    let pool = sample_pool(&dir);
    let want = contents(&dir, &pool);
    let dump_file = dir.path("meta.json");
    ok(&pool, &["dump", "--output", dump_file.to_str().unwrap()]);
    let d = J::parse(&fs::read_to_string(&dump_file).unwrap());
    assert_eq!(d.str("format"), "thinlun-metadata-dump");
    assert_eq!(d.at("volumes").arr().len(), 3);
    let clone = volume(&d, "clone-1");
    assert_eq!(clone.str("clone_of"), "vm-1@s1");
    assert_eq!(volume(&d, "vm-1@s1").str("snapshot_of"), "vm-1");
    assert!(!volume(&d, "vm-1").at("extents").arr().is_empty());

    // Wipe every metadata record: everything before the data area, and
    // every catalog, volume-header and tree-node block inside it.
    let data_start = d.at("pool").num("data_start") as usize;
    let mut img = fs::read(&pool).unwrap();
    img[..data_start * BLOCK].fill(0);
    let mut wiped = 0;
    for blk in img.chunks_mut(BLOCK) {
        if [&b"TLNODE\0\0"[..], b"TLCATLG\0", b"TLVOLHD\0"].contains(&&blk[0..8]) {
            blk.fill(0);
            wiped += 1;
        }
    }
    assert!(wiped >= 7, "catalog, 6 headers and nodes: {wiped}");
    fs::write(&pool, &img).unwrap();
    expect(8, &pool, &["check"]);

    // A dry run verifies and writes nothing.
    let out = ok(
        &pool,
        &[
            "restore",
            "--input",
            dump_file.to_str().unwrap(),
            "--dry-run",
        ],
    );
    assert!(
        out.contains("would restore 2 volumes and 1 snapshot"),
        "{out}"
    );
    assert!(fs::read(&pool).unwrap() == img);
    let out = ok(&pool, &["restore", "--input", dump_file.to_str().unwrap()]);
    assert!(out.contains("restored 2 volumes and 1 snapshot"), "{out}");
    assert_clean(&pool);
    assert_eq!(contents(&dir, &pool), want);

    // dump -> restore -> dump: identical except the on_disk parts.
    let again = dump_json(&pool);
    let strip = |j: &J| -> J {
        let mut top = j.as_object().expect("a dump is an object").clone();
        if let Some(J::Object(p)) = top.get_mut("pool") {
            p.remove("on_disk");
        }
        if let Some(J::Array(vols)) = top.get_mut("volumes") {
            for v in vols {
                if let J::Object(v) = v {
                    v.remove("on_disk");
                }
            }
        }
        J::Object(top)
    };
    assert_eq!(strip(&again), strip(&d));
    assert_ne!(again.at("pool").at("on_disk"), d.at("pool").at("on_disk"));

    // Restoring over a pool that opens needs --force; with it, same data.
    let out = expect(
        1,
        &pool,
        &["restore", "--input", dump_file.to_str().unwrap()],
    );
    assert!(out.contains("--force"), "{out}");
    ok(
        &pool,
        &["restore", "--input", dump_file.to_str().unwrap(), "--force"],
    );
    assert_clean(&pool);
    assert_eq!(contents(&dir, &pool), want);

    // Another geometry is refused, even with --force, and nothing changes.
    let other = dir.path("other.img");
    ok(
        &other,
        &["pool", "create", "--size", "64M", "--chunk-size", "128K"],
    );
    let before = fs::read(&other).unwrap();
    let out = expect(
        1,
        &other,
        &["restore", "--input", dump_file.to_str().unwrap(), "--force"],
    );
    assert!(out.contains("geometry"), "{out}");
    assert!(fs::read(&other).unwrap() == before);

    // A damaged dump is refused with its line number.
    let text = fs::read_to_string(&dump_file).unwrap();
    let bad = dir.path("bad.json");
    fs::write(
        &bad,
        text.replacen("\"extents\": [", "\"extents\": [[1, 2],", 1),
    )
    .unwrap();
    let out = expect(
        1,
        &pool,
        &["restore", "--input", bad.to_str().unwrap(), "--force"],
    );
    assert!(out.contains("extent"), "{out}");
}

#[test]
fn help_texts_document_the_commands() {
    let dir = TempDir::new("repair-help");
    let p = dir.path("none.img");
    for (args, needle) in [
        (&["repair", "--help"][..], "without guessing"),
        (&["check", "--help"], "1 problems found and repaired"),
        (&["dump", "--help"], "FORMAT.md"),
        (&["restore", "--help"], "another pool geometry"),
    ] {
        let out = ok(&p, args);
        assert!(out.contains(needle), "{args:?}: {out}");
    }
}

/// Bytes no record could decode from: what `dd if=/dev/urandom` leaves.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Issue 17 item 2: what check warns about and says repair rewrites, repair
/// rewrites: a host slot block overwritten with random bytes on a
/// single-host pool.
#[test]
fn repair_rewrites_a_damaged_host_slot_that_check_warns_about() {
    let dir = TempDir::new("repair-slot");
    let pool = sample_pool(&dir);
    let want = contents(&dir, &pool);
    let mut img = fs::read(&pool).unwrap();
    // dd if=/dev/urandom of=pool.img bs=4096 count=1 seek=16 conv=notrunc
    img[16 * BLOCK..17 * BLOCK].copy_from_slice(&noise(BLOCK, 7));
    fs::write(&pool, &img).unwrap();
    let out = expect(0, &pool, &["check"]);
    assert!(
        out.contains("host slot at block 16") && out.contains("'thinctl repair' rewrites it"),
        "{out}"
    );
    let out = thinctl(&pool, &["repair", "--json"]);
    assert_eq!(out.status.code(), Some(1), "repaired: {out:?}");
    let r = J::parse(&text(&out.stdout));
    assert_eq!(r.at("repaired"), &J::Bool(true), "{r:?}");
    assert_eq!(r.at("clean_after"), &J::Bool(true), "{r:?}");
    match r.at("fixes").arr() {
        [J::String(fix)] => assert!(fix.contains("host slot at block 16"), "{fix}"),
        other => panic!("one fix expected: {other:?}"),
    }
    assert_clean(&pool);
    assert_eq!(contents(&dir, &pool), want);
    // And a second repair finds nothing.
    let out = expect(0, &pool, &["repair"]);
    assert!(out.contains("nothing to repair"), "{out}");
}

/// Issue 17 item 3: restore onto metadata overwritten with random bytes
/// (the first 2 MiB, a wrong dd), not only onto zeroed metadata.
#[test]
fn restore_onto_random_metadata_gives_back_the_data() {
    let dir = TempDir::new("restore-random");
    let pool = sample_pool(&dir);
    let want = contents(&dir, &pool);
    let dump_file = dir.path("meta.json");
    ok(&pool, &["dump", "--output", dump_file.to_str().unwrap()]);
    let d = J::parse(&fs::read_to_string(&dump_file).unwrap());
    let two_mib = 2 << 20;
    assert!(d.at("pool").num("data_start") as usize * BLOCK > two_mib);
    let mut img = fs::read(&pool).unwrap();
    img[..two_mib].copy_from_slice(&noise(two_mib, 99));
    fs::write(&pool, &img).unwrap();
    expect(4, &pool, &["check"]);
    let out = ok(
        &pool,
        &["restore", "--input", dump_file.to_str().unwrap(), "--force"],
    );
    assert!(out.contains("restored 2 volumes and 1 snapshot"), "{out}");
    assert_clean(&pool);
    assert_eq!(contents(&dir, &pool), want);
}
