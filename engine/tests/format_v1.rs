//! Pools written before ditto nodes (format version 1, single-copy tree
//! nodes; made by an older build, tests/fixtures/README.md) still open,
//! read and write, and keep single copies; `dump` + `restore` converts one
//! to ditto nodes, and a dump made by that build still restores.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use thinlun::check::check;
use thinlun::dev::MemDevice;
use thinlun::dump::{MetadataDump, RestoreOptions};
use thinlun::{OpenOptions, Pool};

const BS: usize = 4096;
const VOL: usize = 4 << 20;

fn gunzip(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("gzip").args(["-dc", &path]).output().unwrap();
    assert!(out.status.success(), "gzip -dc {path}");
    out.stdout
}

/// What the fixture's volumes hold (fixtures/README.md).
fn expected() -> BTreeMap<&'static str, Vec<u8>> {
    let mut base = vec![0u8; VOL];
    for b in (0..512).step_by(2) {
        base[b * BS..(b + 1) * BS].fill((b * 7 + 1) as u8);
    }
    let mut clone = base.clone();
    clone[..BS].fill(0xab);
    let mut vm2 = vec![0u8; VOL];
    vm2[..BS].fill(0xab);
    BTreeMap::from([
        ("vm-1", base.clone()),
        ("vm-1@s1", base),
        ("clone-1", clone),
        ("vm-2", vm2),
    ])
}

fn contents(pool: &Pool, names: impl IntoIterator<Item = String>) -> BTreeMap<String, Vec<u8>> {
    names
        .into_iter()
        .map(|n| {
            let mut buf = vec![0u8; VOL];
            pool.open_volume(&n).unwrap().read(0, &mut buf).unwrap();
            (n, buf)
        })
        .collect()
}

fn as_owned(m: BTreeMap<&str, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Version-2 node blocks of an image (ditto copies).
fn ditto_node_blocks(img: &[u8]) -> usize {
    img.chunks(BS)
        .filter(|b| b.starts_with(b"TLNODE") && u16::from_le_bytes([b[8], b[9]]) == 2)
        .count()
}

#[test]
fn a_version_1_pool_opens_works_and_keeps_single_copies() {
    let img = gunzip("v1-pool.img.gz");
    let dev = Arc::new(MemDevice::from_image(img));
    let report = check(dev.as_ref(), "v1").unwrap();
    assert!(
        report.is_clean() && report.warnings.is_empty(),
        "{report:?}"
    );
    let mut want = as_owned(expected());
    let pool = Pool::open(dev.clone(), "v1", &OpenOptions::default()).unwrap();
    let st = pool.status();
    assert_eq!((st.format_version, st.node_copies), (1, 1));
    assert_eq!(contents(&pool, want.keys().cloned()), want);
    // Writes that split leaves, a snapshot, a checkpoint: all single copy.
    let v = pool.open_volume("vm-2").unwrap();
    for b in (0..1024u64).step_by(3) {
        v.write(b * 8, &vec![b as u8 | 1; BS]).unwrap();
        want.get_mut("vm-2").unwrap()[b as usize * BS..(b as usize + 1) * BS].fill(b as u8 | 1);
    }
    drop(v);
    pool.create_snapshot("vm-2@after").unwrap();
    want.insert("vm-2@after".into(), want["vm-2"].clone());
    pool.checkpoint().unwrap();
    pool.close().unwrap();
    assert_eq!(
        ditto_node_blocks(&dev.image()),
        0,
        "a v1 pool got ditto nodes"
    );
    let report = check(dev.as_ref(), "v1").unwrap();
    assert!(
        report.is_clean() && report.warnings.is_empty(),
        "{report:?}"
    );
    let pool = Pool::open(dev.clone(), "v1", &OpenOptions::default()).unwrap();
    assert_eq!(contents(&pool, want.keys().cloned()), want);
    pool.close().unwrap();

    // dump + restore writes the current format: every node twice.
    let d = thinlun::dump::dump(dev.as_ref(), "v1").unwrap();
    let opts = RestoreOptions {
        force: true,
        dry_run: false,
    };
    thinlun::dump::restore(dev.clone(), "v1", &d, &opts).unwrap();
    assert!(ditto_node_blocks(&dev.image()) > 0);
    let pool = Pool::open(dev.clone(), "v1", &OpenOptions::default()).unwrap();
    let st = pool.status();
    assert_eq!((st.format_version, st.node_copies), (2, 2));
    assert_eq!(contents(&pool, want.keys().cloned()), want);
    pool.close().unwrap();
    let report = check(dev.as_ref(), "v1").unwrap();
    assert!(
        report.is_clean() && report.warnings.is_empty(),
        "{report:?}"
    );
}

#[test]
fn a_dump_made_before_ditto_nodes_restores() {
    let text = String::from_utf8(gunzip("v1-pool.dump.json.gz")).unwrap();
    assert!(!text.contains("root_twin"));
    let d = MetadataDump::from_json(&text).unwrap();
    // Onto the pool it was made of, damaged beyond opening: its data
    // blocks are still there, its metadata is rebuilt from the dump.
    let mut img = gunzip("v1-pool.img.gz");
    img[..BS].fill(0);
    img[8 * BS..9 * BS].fill(0);
    let dev = Arc::new(MemDevice::from_image(img));
    thinlun::dump::restore(dev.clone(), "v1", &d, &RestoreOptions::default()).unwrap();
    let pool = Pool::open(dev.clone(), "v1", &OpenOptions::default()).unwrap();
    let want = as_owned(expected());
    assert_eq!(contents(&pool, want.keys().cloned()), want);
    assert_eq!(pool.status().node_copies, 2);
}
