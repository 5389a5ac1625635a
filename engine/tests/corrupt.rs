//! Damage every kind of metadata record — flipped bits, zeroed blocks — and
//! check that opening the pool either fails with a clear error or returns
//! exactly the data that was written: never a panic, never wrong data.

use std::collections::BTreeMap;
use std::sync::Arc;
use thinlun::check::check;
use thinlun::dev::MemDevice;
use thinlun::{OpenOptions, Pool, PoolConfig};

const BS: usize = 4096;

fn build() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let dev = Arc::new(MemDevice::new(16 << 20));
    let cfg = PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts: 2,
        journal_bytes: Some(64 * 4096),
        ..PoolConfig::default()
    };
    let pool = Pool::create(dev.clone(), "mem", &cfg).unwrap();
    let mut want = BTreeMap::new();
    for (i, name) in ["vm-1-disk-0", "vm-2-disk-0"].iter().enumerate() {
        pool.create_volume(name, 1 << 20).unwrap();
        let v = pool.open_volume(name).unwrap();
        for b in 0..300u64 {
            // Many scattered extents: several leaves per volume.
            v.write((b * 7 % 256) * 8, &vec![(b as u8) ^ (i as u8 * 100); BS])
                .unwrap();
        }
        v.flush().unwrap();
    }
    pool.create_snapshot("vm-1-disk-0@s").unwrap();
    pool.checkpoint().unwrap();
    // Some changes only in the journal (flushed, not checkpointed).
    let v = pool.open_volume("vm-1-disk-0").unwrap();
    v.write(0, &vec![0xee; 8 * BS]).unwrap();
    v.flush().unwrap();
    drop(v);
    for name in ["vm-1-disk-0", "vm-2-disk-0", "vm-1-disk-0@s"] {
        let v = pool.open_volume(name).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        v.read(0, &mut buf).unwrap();
        want.insert(name.to_string(), buf);
    }
    // A last commit whose loss nobody could see (zeros over a hole): a
    // damaged final commit is indistinguishable from a torn one, exactly
    // like a power loss before it completed.
    pool.create_volume("pad", 1 << 20).unwrap();
    let pad = pool.open_volume("pad").unwrap();
    pad.write(0, &vec![0u8; BS]).unwrap();
    pad.flush().unwrap();
    drop(pad);
    // Leave it without a clean close so the journal is live.
    let img = dev.image();
    std::mem::forget(pool);
    (img, want)
}

/// Blocks holding metadata records, found by their magic.
fn metadata_blocks(img: &[u8]) -> Vec<(usize, String)> {
    img.chunks(BS)
        .enumerate()
        .filter_map(|(i, b)| {
            let m = &b[..8];
            (m.starts_with(b"TL") || m.starts_with(b"THINLUN")).then(|| {
                (
                    i,
                    String::from_utf8_lossy(m)
                        .trim_end_matches('\0')
                        .to_string(),
                )
            })
        })
        .collect()
}

fn try_open(img: Vec<u8>, want: &BTreeMap<String, Vec<u8>>, what: &str) -> bool {
    let dev = Arc::new(MemDevice::from_image(img));
    // check must not panic, whatever it finds.
    let report = check(dev.as_ref(), "mem");
    let Ok(pool) = Pool::open(
        dev,
        "mem",
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    ) else {
        assert!(
            report.map_or(true, |r| !r.is_clean()),
            "{what}: open failed but check says clean"
        );
        return false;
    };
    for (name, data) in want {
        let v = match pool.open_volume(name) {
            Ok(v) => v,
            Err(e) => panic!("{what}: pool opened but volume {name} is gone: {e}"),
        };
        let mut buf = vec![0u8; data.len()];
        v.read(0, &mut buf).unwrap();
        assert!(&buf == data, "{what}: volume {name} returns wrong data");
    }
    true
}

#[test]
fn damaged_metadata_is_reported_or_survived_never_misread() {
    let (img, want) = build();
    let blocks = metadata_blocks(&img);
    let mut kinds: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    for &(b, ref kind) in &blocks {
        // Enough of each kind (the allocation-group table alone has hundreds).
        let n = per_kind.entry(kind.clone()).or_default();
        *n += 1;
        if *n > 16 {
            continue;
        }
        // A flipped bit in the header, in the body, and a zeroed block.
        for (label, off) in [
            ("magic", 3usize),
            ("crc", 13),
            ("self", 17),
            ("body", 40),
            ("entries", 70),
            ("tail", 4000),
        ] {
            let mut bad = img.clone();
            bad[b * BS + off] ^= 0x10;
            let ok = try_open(
                bad,
                &want,
                &format!("{kind} block {b}, bit flip in {label}"),
            );
            let e = kinds.entry(kind.clone()).or_default();
            if ok {
                e.0 += 1
            } else {
                e.1 += 1
            }
        }
        let mut zeroed = img.clone();
        zeroed[b * BS..(b + 1) * BS].fill(0);
        try_open(zeroed, &want, &format!("{kind} block {b}, zeroed"));
    }
    for (kind, (survived, refused)) in &kinds {
        eprintln!("{kind}: {survived} damaged copies survived (redundant or unused), {refused} refused with an error");
    }
    for kind in [
        "THINLUN\u{1}",
        "TLCATLG",
        "TLVOLHD",
        "TLNODE",
        "TLJRNL",
        "TLHOSTCK",
        "TLAGTAB",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} block was damaged: {:?}",
            kinds.keys()
        );
    }
}
