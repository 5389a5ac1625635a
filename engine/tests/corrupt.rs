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
        match v.read(0, &mut buf) {
            Ok(()) => assert!(&buf == data, "{what}: volume {name} returns wrong data"),
            // A damaged tree node costs its volume the range it mapped:
            // every other block must still read back exactly.
            Err(thinlun::Error::Damaged { .. }) => {
                let info = pool.volume_info(name).unwrap();
                assert!(
                    !info.damage.is_empty(),
                    "{what}: {name}: damage error, none listed"
                );
                for (b, want_block) in data.chunks(BS).enumerate() {
                    let r = v.read(b as u64 * 8, &mut buf[..BS]);
                    let inside = info
                        .damage
                        .iter()
                        .any(|d| (d.start_block..d.end_block).contains(&(b as u64)));
                    match r {
                        Ok(()) => assert!(
                            !inside && &buf[..BS] == want_block,
                            "{what}: volume {name} block {b} returns wrong data"
                        ),
                        Err(e) => assert!(inside, "{what}: {name} block {b}: {e}"),
                    }
                }
            }
            Err(e) => panic!("{what}: volume {name}: {e}"),
        }
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

// ---------------------------------------------------------------------------
// Isolation (issue 19): one damaged mapping-tree node costs only the volumes
// whose tree holds it, and of those only the range it mapped.

const VOL: u64 = 4 << 20;

fn pattern(name: &str, block: u64, gen: u8) -> Vec<u8> {
    let seed = name
        .bytes()
        .fold(gen as u64, |h, b| h.wrapping_mul(31) ^ b as u64);
    let mut v = vec![0u8; BS];
    for (i, x) in v.iter_mut().enumerate() {
        *x = (seed ^ block.wrapping_mul(0x9e37) ^ (i as u64 >> 6)) as u8;
    }
    v[0] = gen.max(1);
    v
}

fn write_blocks(pool: &Pool, name: &str, blocks: impl Iterator<Item = u64>, gen: u8) {
    let v = pool.open_volume(name).unwrap();
    for b in blocks {
        v.write(b * 8, &pattern(name, b, gen)).unwrap();
    }
    v.flush().unwrap();
}

/// Every volume's full contents, by name.
fn contents(pool: &Pool) -> BTreeMap<String, Vec<u8>> {
    pool.volumes()
        .iter()
        .map(|i| {
            let v = pool.open_volume(&i.name).unwrap();
            let mut buf = vec![0u8; i.size_bytes as usize];
            v.read(0, &mut buf).unwrap();
            (i.name.clone(), buf)
        })
        .collect()
}

fn small_pool(dev: Arc<MemDevice>) -> Pool {
    let cfg = PoolConfig {
        chunk_bytes: 64 << 10,
        journal_bytes: Some(64 * 4096),
        ..PoolConfig::default()
    };
    Pool::create(dev, "mem", &cfg).unwrap()
}

/// A pool with a volume and its snapshot that diverged, an unrelated
/// volume, and a base with two clones (one with data of its own), every
/// tree several leaves under an interior root; closed cleanly.
fn family_pool() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let dev = Arc::new(MemDevice::new(48 << 20));
    let pool = small_pool(dev.clone());
    // Every other block: one extent each, so 512 extents, 3 leaves.
    let sparse = || (0..VOL / BS as u64).step_by(2);
    for name in ["vm-a", "vm-b", "tmpl"] {
        pool.create_volume(name, VOL).unwrap();
        write_blocks(&pool, name, sparse(), 1);
    }
    pool.create_snapshot("vm-a@s1").unwrap();
    // vm-a diverges from its snapshot in its last leaf only.
    write_blocks(&pool, "vm-a", (900..1000).step_by(2), 2);
    pool.make_base("tmpl", None).unwrap();
    pool.clone_volume("tmpl", "clone-1").unwrap();
    pool.clone_volume("tmpl", "clone-2").unwrap();
    // clone-1's own part: its first leaf.
    write_blocks(&pool, "clone-1", (0..40).step_by(2), 3);
    let want = contents(&pool);
    pool.close().unwrap();
    (dev.image(), want)
}

/// A node of some tree: its block (and its twin's, for a ditto node),
/// level and the virtual range its parent gives it.
#[derive(Clone, Debug)]
struct NodeAt {
    block: u64,
    twin: u64,
    level: u16,
    lo: u64,
    hi: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Walks a volume's tree on the image (format 4.7) from its root. A ditto
/// node (version 2) names its twin at byte 48, and its interior entries
/// are 24 bytes.
fn tree_nodes(img: &[u8], root: u64) -> Vec<NodeAt> {
    let mut out = Vec::new();
    if root == 0 {
        return out;
    }
    let mut todo = vec![(root, 0u64, u64::MAX)];
    while let Some((block, lo, hi)) = todo.pop() {
        let b = &img[block as usize * BS..(block as usize + 1) * BS];
        let ditto = u16::from_le_bytes([b[8], b[9]]) == 2;
        let level = u16::from_le_bytes([b[10], b[11]]);
        let count = u32::from_le_bytes(b[40..44].try_into().unwrap()) as usize;
        out.push(NodeAt {
            block,
            twin: if ditto { u64_at(b, 48) } else { 0 },
            level,
            lo,
            hi,
        });
        let stride = if ditto { 24 } else { 16 };
        if level > 0 {
            for i in 0..count {
                let key = u64_at(b, 64 + stride * i);
                let child = u64_at(b, 72 + stride * i);
                let child_hi = if i + 1 < count {
                    u64_at(b, 64 + stride * (i + 1))
                } else {
                    hi
                };
                todo.push((child, key, child_hi));
            }
        }
    }
    out
}

/// Each volume's tree nodes, by display name.
fn trees(img: &[u8]) -> BTreeMap<String, Vec<NodeAt>> {
    let dev = MemDevice::from_image(img.to_vec());
    let d = thinlun::dump::dump(&dev, "mem").unwrap();
    let name_of = |id: u64| d.volumes.iter().find(|v| v.id == id).unwrap().name.clone();
    d.volumes
        .iter()
        .map(|v| {
            let full = if v.parent_id != 0 && v.flags & 1 != 0 {
                format!("{}@{}", name_of(v.parent_id), v.name)
            } else {
                v.name.clone()
            };
            (full, tree_nodes(img, v.on_disk.root))
        })
        .collect()
}

fn open_rw(img: Vec<u8>) -> (Arc<MemDevice>, Pool) {
    let dev = Arc::new(MemDevice::from_image(img));
    let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
    (dev, pool)
}

/// Damages both copies of node `n` as `how` says.
fn damage(img: &mut [u8], n: &NodeAt, how: &str, other: u64) {
    assert!(n.twin != 0, "pools are made with ditto nodes");
    damage_copy(img, n.block, how, other);
    damage_copy(img, n.twin, how, other);
}

/// Damages block `node` of `img` as `how` says.
fn damage_copy(img: &mut [u8], node: u64, how: &str, other: u64) {
    let at = node as usize * BS;
    match how {
        "bit flip" => img[at + 200] ^= 0x04,
        "zeroed" => img[at..at + BS].fill(0),
        // The node's block holds what was meant for another block: a
        // valid node, with the other block's address in it.
        "misdirected" => {
            let src = img[other as usize * BS..(other as usize + 1) * BS].to_vec();
            img[at..at + BS].copy_from_slice(&src);
        }
        _ => unreachable!(),
    }
}

/// Checks a pool with node `n` damaged: the volumes whose tree holds it are
/// listed as damaged with exactly its range, fail reads only there and
/// every write; all others read back byte-identical and stay writable.
fn verify_isolated(
    pool: &Pool,
    dev: &MemDevice,
    want: &BTreeMap<String, Vec<u8>>,
    hit: &[String],
    n: &NodeAt,
    what: &str,
) {
    let infos = pool.volumes();
    assert_eq!(
        infos.len(),
        want.len(),
        "{what}: list must show every volume"
    );
    for info in &infos {
        let data = &want[&info.name];
        let v = pool.open_volume(&info.name).unwrap();
        let mut buf = vec![0u8; data.len()];
        if !hit.contains(&info.name) {
            assert!(
                info.damage.is_empty(),
                "{what}: {} marked damaged",
                info.name
            );
            v.read(0, &mut buf).unwrap();
            assert!(
                &buf == data,
                "{what}: {} reads back different data",
                info.name
            );
            continue;
        }
        let end = info.size_bytes / BS as u64;
        let (lo, hi) = (n.lo.min(end), n.hi.min(end));
        assert_eq!(
            info.damage.len(),
            1,
            "{what}: {}: {:?}",
            info.name,
            info.damage
        );
        let d = &info.damage[0];
        assert_eq!(
            (d.start_block, d.end_block, d.node_block),
            (lo, hi, n.block),
            "{what}: {}",
            info.name
        );
        assert_eq!(d.sectors(), (lo * 8, hi * 8));
        // Block status never calls the damaged range a hole (NBD clients
        // would skip it and take it for zeros).
        let alloc = v.allocation(lo * BS as u64, (hi - lo) * BS as u64).unwrap();
        assert!(
            alloc.iter().all(|a| a.1),
            "{what}: {}: {alloc:?}",
            info.name
        );
        let mapped = pool.mapped_ranges(&info.name).unwrap();
        assert!(
            mapped
                .iter()
                .any(|&(o, l)| o <= lo * BS as u64 && (hi * BS as u64) <= o + l),
            "{what}: {}: {mapped:?}",
            info.name
        );
        // Outside the range, in one read each side; inside, every block fails.
        if lo > 0 {
            v.read(0, &mut buf[..lo as usize * BS]).unwrap();
            assert!(
                buf[..lo as usize * BS] == data[..lo as usize * BS],
                "{what}: {} before the damage",
                info.name
            );
        }
        if hi < end {
            let r = hi as usize * BS..data.len();
            v.read(hi * 8, &mut buf[r.clone()]).unwrap();
            assert!(
                buf[r.clone()] == data[r],
                "{what}: {} after the damage",
                info.name
            );
        }
        for b in (lo..hi).step_by(97).chain([hi - 1]) {
            let e = v.read(b * 8, &mut buf[..512]).unwrap_err();
            assert!(matches!(e, thinlun::Error::Damaged { .. }), "{what}: {e}");
            assert_eq!(e.errno(), libc_eio(), "{what}");
        }
        let e = v.write(0, &[0u8; 512]).unwrap_err();
        assert!(
            matches!(e, thinlun::Error::Damaged { .. }) || matches!(e, thinlun::Error::ReadOnly(_)),
            "{what}: write to {}: {e}",
            info.name
        );
    }
    let report = check(dev, "mem").unwrap();
    for name in want.keys() {
        let named = report
            .errors
            .iter()
            .any(|e| e.contains(&format!("volume '{name}' is damaged")));
        assert_eq!(
            named,
            hit.contains(name),
            "{what}: check about {name}: {:?}",
            report.errors
        );
    }
    assert_eq!(
        report.errors.len(),
        hit.len(),
        "{what}: {:?}",
        report.errors
    );
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn one_damaged_node_costs_only_the_volumes_sharing_it() {
    let (img, want) = family_pool();
    let trees = trees(&img);
    let mut cases: BTreeMap<&str, usize> = BTreeMap::new();
    let mut nodes: Vec<NodeAt> = trees.values().flatten().cloned().collect();
    nodes.sort_by_key(|n| n.block);
    nodes.dedup_by_key(|n| n.block);
    assert!(nodes.len() >= 14, "{nodes:?}");
    for n in &nodes {
        let hit: Vec<String> = trees
            .iter()
            .filter(|(_, t)| t.iter().any(|m| m.block == n.block))
            .map(|(name, _)| name.clone())
            .collect();
        let kind = match (hit.len(), n.level) {
            (1, 0) if hit[0].contains('@') => "snapshot's own leaf",
            (1, 0) if hit[0].starts_with("clone") => "clone's own leaf",
            (1, 0) => "volume's own leaf",
            (1, _) if hit[0].contains('@') => "snapshot's root",
            (1, _) => "volume's root",
            (_, 0) if hit.iter().any(|h| h == "tmpl") => "base leaf shared by clones",
            _ => "leaf shared by a volume and its snapshot",
        };
        *cases.entry(kind).or_default() += 1;
        let other = nodes.iter().find(|m| m.block != n.block).unwrap().block;
        for how in ["bit flip", "zeroed", "misdirected"] {
            let what = format!("{how} in {kind} at block {}", n.block);
            let mut bad = img.clone();
            damage(&mut bad, n, how, other);
            let (dev, pool) = open_rw(bad);
            verify_isolated(&pool, &dev, &want, &hit, n, &what);
            drop(pool);
        }
    }
    for kind in [
        "volume's own leaf",
        "volume's root",
        "snapshot's own leaf",
        "snapshot's root",
        "clone's own leaf",
        "base leaf shared by clones",
        "leaf shared by a volume and its snapshot",
    ] {
        assert!(cases.contains_key(kind), "no case of {kind}: {cases:?}");
    }
}

/// The healthy volumes of a damaged pool keep working across reopens:
/// writes that allocate, snapshots, removal of an unrelated volume; what
/// the damaged volume could read stays as it was; nothing is ever owned
/// twice.
#[test]
fn healthy_volumes_of_a_damaged_pool_work_normally() {
    let (mut img, mut want) = family_pool();
    let trees = trees(&img);
    // vm-a's last leaf (own, diverged from its snapshot).
    let leaf = last_leaf(&trees["vm-a"]).clone();
    damage(&mut img, &leaf, "zeroed", 0);
    let hit = vec!["vm-a".to_string()];
    let (dev, pool) = open_rw(img);
    let before = pool.status();
    // The unreadable leaf's blocks count as used.
    write_blocks(&pool, "vm-b", 0..(VOL / BS as u64), 4);
    write_blocks(&pool, "clone-2", (1..200).step_by(2), 5);
    pool.create_volume("vm-new", VOL).unwrap();
    write_blocks(&pool, "vm-new", 0..(VOL / BS as u64), 6);
    pool.create_snapshot("vm-b@after").unwrap();
    let e = pool.create_snapshot("vm-a@s2").unwrap_err();
    assert!(matches!(e, thinlun::Error::Damaged { .. }), "{e}");
    assert!(pool.remove_volume("vm-a", true).is_err());
    assert!(
        pool.remove_volume("vm-a@s1", false).is_err(),
        "shares blocks with vm-a"
    );
    assert!(pool.verify_space().is_empty(), "{:?}", pool.verify_space());
    assert!(pool.status().data_used_bytes > before.data_used_bytes);
    for name in ["vm-b", "clone-2", "vm-new", "vm-b@after"] {
        let v = pool.open_volume(name).unwrap();
        let mut buf = vec![0u8; VOL as usize];
        v.read(0, &mut buf).unwrap();
        want.insert(name.to_string(), buf);
    }
    pool.close().unwrap();
    let img = dev.image();
    let (dev, pool) = open_rw(img);
    verify_isolated(&pool, &dev, &want, &hit, &leaf, "after writes and a reopen");
    pool.remove_volume("vm-new", false).unwrap();
    want.remove("vm-new");
    pool.close().unwrap();
    let (dev, pool) = open_rw(dev.image());
    verify_isolated(
        &pool,
        &dev,
        &want,
        &hit,
        &leaf,
        "after a removal and a reopen",
    );
}

/// Journal entries of a damaged volume that no checkpoint folded in must
/// survive checkpoints that skip its tree.
#[test]
fn journaled_writes_of_a_damaged_volume_survive_checkpoints() {
    let (img, _) = family_pool();
    let (dev, pool) = open_rw(img);
    // Into vm-a's first leaf, journaled but not checkpointed.
    write_blocks(&pool, "vm-a", [1u64, 3, 5].into_iter(), 7);
    let mut want = contents(&pool);
    let img = dev.image();
    std::mem::forget(pool);
    let trees = trees(&img);
    let leaf = last_leaf(&trees["vm-a"]).clone();
    assert!(leaf.lo > 5);
    let mut bad = img;
    damage(&mut bad, &leaf, "bit flip", 0);
    let hit = vec!["vm-a".to_string()];
    let (dev, pool) = open_rw(bad);
    verify_isolated(&pool, &dev, &want, &hit, &leaf, "journal replayed");
    // Checkpoints, by writes elsewhere and by closing.
    write_blocks(&pool, "vm-b", 0..64, 8);
    pool.checkpoint().unwrap();
    let mut buf = vec![0u8; VOL as usize];
    pool.open_volume("vm-b").unwrap().read(0, &mut buf).unwrap();
    want.insert("vm-b".into(), buf);
    pool.close().unwrap();
    let (dev, pool) = open_rw(dev.image());
    verify_isolated(&pool, &dev, &want, &hit, &leaf, "after checkpoints");
    pool.close().unwrap();
    let (dev, pool) = open_rw(dev.image());
    verify_isolated(&pool, &dev, &want, &hit, &leaf, "after a second reopen");
}

// Salvage (issue 19, item 3): `thinlun::salvage::salvage` rebuilds a
// damaged volume's tree from its readable part.

/// `want[name]` with blocks `lo..hi` zeroed: what a salvaged volume reads.
fn zeroed(data: &[u8], lo: u64, hi: u64) -> Vec<u8> {
    let mut d = data.to_vec();
    let end = (hi as usize * BS).min(d.len());
    d[(lo as usize * BS).min(end)..end].fill(0);
    d
}

/// The single node of `trees` matching `pick`, and the volumes holding it.
fn node_of(
    trees: &BTreeMap<String, Vec<NodeAt>>,
    pick: impl Fn(&str, &NodeAt) -> bool,
) -> (NodeAt, Vec<String>) {
    let n = trees
        .iter()
        .flat_map(|(name, t)| t.iter().map(move |n| (name, n)))
        .find(|(name, n)| pick(name, n))
        .map(|(_, n)| n.clone())
        .expect("a node to damage");
    let hit = trees
        .iter()
        .filter(|(_, t)| t.iter().any(|m| m.block == n.block))
        .map(|(name, _)| name.clone())
        .collect();
    (n, hit)
}

/// Every volume of the pool on `dev`, read as it is now: `Err` names a
/// damaged volume's range.
fn state_of(dev: &Arc<MemDevice>) -> BTreeMap<String, Result<Vec<u8>, (u64, u64)>> {
    let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
    let out = pool
        .volumes()
        .iter()
        .map(|i| {
            if let Some(d) = i.damage.first() {
                return (i.name.clone(), Err((d.start_block, d.end_block)));
            }
            let v = pool.open_volume(&i.name).unwrap();
            let mut buf = vec![0u8; i.size_bytes as usize];
            v.read(0, &mut buf).unwrap();
            (i.name.clone(), Ok(buf))
        })
        .collect();
    pool.close().unwrap();
    out
}

fn salvage(dev: &Arc<MemDevice>, names: &[&str], dry_run: bool) -> thinlun::salvage::SalvageReport {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    thinlun::salvage::salvage(dev.clone(), "mem", &names, dry_run).unwrap()
}

/// Salvage of a volume's own leaf, a snapshot's own leaf, a snapshot's
/// root, and a clone's own leaf: the volume reads zeros exactly in the
/// reported range and its data elsewhere, takes writes and snapshots,
/// every other volume is byte-identical, check is clean, and the space
/// adds up (check verifies every block is owned by exactly what uses it).
#[test]
fn salvage_rebuilds_a_damaged_tree_and_changes_nothing_else() {
    let (img, want) = family_pool();
    let trees = trees(&img);
    let last_leaf = |vol: &'static str| {
        let max_lo = last_leaf(&trees[vol]).lo;
        move |name: &str, n: &NodeAt| name == vol && n.level == 0 && n.lo == max_lo
    };
    let cases: Vec<(&str, (NodeAt, Vec<String>))> = vec![
        ("volume's own leaf", node_of(&trees, last_leaf("vm-a"))),
        ("snapshot's own leaf", node_of(&trees, last_leaf("vm-a@s1"))),
        (
            "snapshot's root",
            node_of(&trees, |name, n| name == "vm-a@s1" && n.level > 0),
        ),
        (
            "clone's own leaf",
            node_of(&trees, |name, n| {
                name == "clone-1" && n.level == 0 && n.lo == 0
            }),
        ),
    ];
    for (kind, (n, hit)) in cases {
        assert_eq!(hit.len(), 1, "{kind}: {hit:?}");
        let name = hit[0].as_str();
        let mut bad = img.clone();
        damage(&mut bad, &n, "bit flip", 0);
        let dev = Arc::new(MemDevice::from_image(bad));
        let damaged_used = {
            let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
            let u = pool.status().data_used_bytes;
            pool.close().unwrap();
            u
        };
        // A dry run verifies in memory and writes nothing.
        let before = dev.image();
        let r = salvage(&dev, &[name], true);
        assert!(r.refused.is_empty(), "{kind}: {r:?}");
        assert!(dev.image() == before, "{kind}: dry run wrote");
        let r = salvage(&dev, &[name], false);
        assert!(
            r.refused.is_empty() && r.blocks_written > 0,
            "{kind}: {r:?}"
        );
        assert_eq!(r.salvaged.len(), 1);
        let s = &r.salvaged[0];
        assert_eq!(s.volume, name);
        assert!(s.shared_with.is_empty(), "{kind}: {s:?}");
        let end = VOL / BS as u64;
        let (lo, hi) = (n.lo.min(end), n.hi.min(end));
        assert_eq!(s.lost.len(), 1, "{kind}");
        let d = &s.lost[0];
        assert_eq!(
            (d.start_block, d.end_block, d.node_block),
            (lo, hi, n.block)
        );
        assert_eq!(d.sectors(), (lo * 8, hi * 8));
        assert!(
            r.after.as_ref().is_some_and(|a| a.is_clean()),
            "{kind}: {r:?}"
        );

        let c = check(dev.as_ref(), "mem").unwrap();
        assert!(
            c.errors.is_empty() && c.warnings.is_empty(),
            "{kind}: {c:?}"
        );
        let now = state_of(&dev);
        for (vol, data) in &want {
            let got = now[vol].as_ref().expect("no damage left");
            if vol == name {
                assert!(*got == zeroed(data, lo, hi), "{kind}: {vol} after salvage");
                // The lost range really held data.
                assert!(zeroed(data, lo, hi) != *data, "{kind}");
            } else {
                assert!(got == data, "{kind}: {vol} changed");
            }
        }
        // Healthy again: writes (also into the lost range), snapshots.
        let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
        assert!(pool.status().data_used_bytes <= damaged_used, "{kind}");
        let writable = !name.contains('@');
        if writable {
            write_blocks(&pool, name, [lo, hi - 1, 0].into_iter(), 9);
            pool.create_snapshot(&format!("{name}@after")).unwrap();
        }
        assert!(
            pool.verify_space().is_empty(),
            "{kind}: {:?}",
            pool.verify_space()
        );
        pool.close().unwrap();
        let c = check(dev.as_ref(), "mem").unwrap();
        assert!(
            c.errors.is_empty() && c.warnings.is_empty(),
            "{kind}: {c:?}"
        );
        if writable {
            let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
            let v = pool.open_volume(name).unwrap();
            let mut buf = vec![0u8; BS];
            v.read(lo * 8, &mut buf).unwrap();
            assert_eq!(buf, pattern(name, lo, 9), "{kind}");
            pool.close().unwrap();
        }
    }
}

/// The leaf of a tree that maps its highest range.
fn last_leaf(t: &[NodeAt]) -> &NodeAt {
    t.iter()
        .filter(|n| n.level == 0)
        .max_by_key(|n| n.lo)
        .expect("a tree with leaves")
}

/// A leaf shared by a volume and its snapshot: salvaging the volume fixes
/// only the volume (the snapshot stays damaged, and the report says it
/// holds the same node); salvaging the snapshot too leaves a clean pool.
/// A base leaf shared by two clones: both named at once.
#[test]
fn salvage_of_a_shared_node_fixes_only_the_volumes_named() {
    let (img, want) = family_pool();
    let trees = trees(&img);
    let (n, hit) = node_of(&trees, |name, n| {
        name == "vm-a" && n.level == 0 && n.lo == 0
    });
    assert_eq!(hit, ["vm-a", "vm-a@s1"]);
    let mut bad = img.clone();
    damage(&mut bad, &n, "zeroed", 0);
    let dev = Arc::new(MemDevice::from_image(bad));
    let r = salvage(&dev, &["vm-a"], false);
    assert!(r.refused.is_empty(), "{r:?}");
    assert_eq!(r.salvaged[0].shared_with, ["vm-a@s1"]);
    let (lo, hi) = (n.lo, n.hi);
    let c = check(dev.as_ref(), "mem").unwrap();
    assert_eq!(c.damaged.len(), 1, "{c:?}");
    assert_eq!(c.damaged[0].0, "vm-a@s1");
    assert_eq!(c.errors.len(), 1, "{c:?}");
    let now = state_of(&dev);
    assert_eq!(now["vm-a@s1"], Err((lo, hi)));
    assert!(now["vm-a"].as_ref().unwrap() == &zeroed(&want["vm-a"], lo, hi));
    for vol in ["vm-b", "tmpl", "clone-1", "clone-2"] {
        assert!(now[vol].as_ref().unwrap() == &want[vol], "{vol}");
    }
    // vm-a may write again; its snapshot still pins the shared blocks.
    {
        let pool = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
        write_blocks(&pool, "vm-a", [0u64, 1].into_iter(), 9);
        assert!(pool.remove_volume("vm-a@s1", false).is_err());
        pool.close().unwrap();
    }
    let r = salvage(&dev, &["vm-a@s1"], false);
    assert!(
        r.refused.is_empty() && r.salvaged[0].shared_with.is_empty(),
        "{r:?}"
    );
    let c = check(dev.as_ref(), "mem").unwrap();
    assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
    let now = state_of(&dev);
    assert!(now["vm-a@s1"].as_ref().unwrap() == &zeroed(&want["vm-a@s1"], lo, hi));

    // The base's first leaf, shared by tmpl and clone-2 (clone-1 has its
    // own): both salvaged in one run.
    let (n, hit) = node_of(&trees, |name, n| {
        name == "tmpl" && n.level == 0 && n.lo == 0
    });
    assert_eq!(hit, ["clone-2", "tmpl"]);
    let mut bad = img.clone();
    damage(&mut bad, &n, "bit flip", 0);
    let dev = Arc::new(MemDevice::from_image(bad));
    let r = salvage(&dev, &["tmpl", "clone-2"], false);
    assert!(r.refused.is_empty() && r.salvaged.len() == 2, "{r:?}");
    let c = check(dev.as_ref(), "mem").unwrap();
    assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
    let now = state_of(&dev);
    for (vol, data) in &want {
        let got = now[vol].as_ref().unwrap();
        if hit.contains(vol) {
            assert!(*got == zeroed(data, n.lo, n.hi), "{vol}");
        } else {
            assert!(got == data, "{vol}");
        }
    }
}

/// Salvage refuses what it cannot do and writes nothing: a healthy
/// volume, a missing one. Plain repair keeps refusing a damaged pool and
/// says how to salvage it.
#[test]
fn salvage_is_only_run_when_asked_for() {
    let (mut img, _) = family_pool();
    let (n, _) = node_of(&trees(&img), |name, n| name == "vm-a" && n.level > 0);
    damage(&mut img, &n, "zeroed", 0);
    let dev = Arc::new(MemDevice::from_image(img));
    let before = dev.image();
    for names in [&["vm-b"][..], &["nope"], &["vm-a", "vm-b"], &[]] {
        let r = salvage(&dev, names, false);
        assert!(
            !r.refused.is_empty() && r.blocks_written == 0,
            "{names:?}: {r:?}"
        );
        assert!(dev.image() == before, "{names:?}");
    }
    let r = thinlun::repair::repair(dev.clone(), "mem", false).unwrap();
    assert!(!r.refused.is_empty() && !r.repaired());
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("'thinctl repair --salvage vm-a'")),
        "{r:?}"
    );
    assert!(dev.image() == before);
}

/// A power loss at any point of a salvage leaves the pool either as it
/// was (the volume damaged, same range) or salvaged; every other volume
/// reads the same in both.
#[test]
fn a_crash_during_salvage_leaves_the_old_or_the_new_state() {
    let (img, want) = family_pool();
    let trees = trees(&img);
    let (n, hit) = node_of(&trees, |name, n| name == "vm-a" && n.level > 0);
    assert_eq!(hit, ["vm-a"]);
    let mut bad = img.clone();
    damage(&mut bad, &n, "bit flip", 0);
    let dev = Arc::new(MemDevice::from_image(bad));
    dev.start_trace();
    let r = salvage(&dev, &["vm-a"], false);
    assert!(r.refused.is_empty(), "{r:?}");
    let trace = dev.take_trace();
    let end = VOL / BS as u64;
    let (lo, hi) = (n.lo.min(end), n.hi.min(end));
    let salvaged = zeroed(&want["vm-a"], lo, hi);
    let (mut old, mut new) = (0, 0);
    let total = trace.events.len();
    assert!(total > 4, "{total}");
    for upto in 0..=total {
        // Unflushed writes: all kept, none kept, every other block kept.
        for mode in 0..3 {
            let image = trace.crash_image(upto, &mut |i, k| match mode {
                0 => true,
                1 => false,
                _ => (i + k) % 2 == 0,
            });
            let crashed = Arc::new(MemDevice::from_image(image));
            let now = state_of(&crashed);
            match &now["vm-a"] {
                Err(range) => {
                    assert_eq!(*range, (lo, hi), "at {upto}/{total}");
                    old += 1;
                }
                Ok(data) => {
                    assert!(
                        *data == salvaged,
                        "at {upto}/{total}: vm-a reads other data"
                    );
                    new += 1;
                }
            }
            for (vol, data) in &want {
                if vol != "vm-a" {
                    assert!(
                        now[vol].as_ref().ok() == Some(data),
                        "at {upto}/{total}: {vol}"
                    );
                }
            }
        }
    }
    assert!(old > 0 && new > 0, "{old} {new}");
}

/// Journaled writes of a damaged volume that no checkpoint folded in:
/// salvage keeps those outside the lost range (they are in its map) and
/// drops those inside it with the range, which reads as zeros.
#[test]
fn salvage_keeps_the_journaled_writes_outside_the_lost_range() {
    let (img, _) = family_pool();
    let leaf = {
        let t = trees(&img);
        let max_lo = last_leaf(&t["vm-a"]).lo;
        node_of(&t, |name, n| {
            name == "vm-a" && n.level == 0 && n.lo == max_lo
        })
        .0
    };
    let (dev, pool) = open_rw(img);
    write_blocks(&pool, "vm-a", [1u64, 3, leaf.lo + 1].into_iter(), 7);
    let want = contents(&pool);
    let img = dev.image();
    std::mem::forget(pool);
    let mut bad = img;
    damage(&mut bad, &leaf, "zeroed", 0);
    let dev = Arc::new(MemDevice::from_image(bad));
    let r = salvage(&dev, &["vm-a"], false);
    assert!(r.refused.is_empty(), "{r:?}");
    let c = check(dev.as_ref(), "mem").unwrap();
    assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
    assert_eq!(c.journal_blocks_replayed, 0, "salvage closes cleanly");
    let now = state_of(&dev);
    let got = now["vm-a"].as_ref().unwrap();
    let end = VOL / BS as u64;
    assert!(*got == zeroed(&want["vm-a"], leaf.lo, leaf.hi.min(end)));
    assert_eq!(got[BS..2 * BS], pattern("vm-a", 1, 7)[..]);
    for (vol, data) in &want {
        if vol != "vm-a" {
            assert!(now[vol].as_ref().unwrap() == data, "{vol}");
        }
    }
}

/// The sequence number of the journal block `b` read from block `at`, if
/// it is one (magic, checksum and self address as docs/FORMAT.md, "Common
/// block header", lays them out; the format's decoders are not public).
fn journal_seq(b: &[u8], at: u64) -> Option<u64> {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&b[..12]);
    crc.update(&[0u8; 4]);
    crc.update(&b[16..]);
    let sealed = b[12..16] == crc.finalize().to_le_bytes();
    (&b[..8] == b"TLJRNL\0\0" && sealed && u64_at(16) == at).then(|| u64_at(24))
}

/// A damaged node and a torn last journal block: plain repair refuses the
/// pool (the damage), so salvage clears the torn block as repair would.
#[test]
fn salvage_also_clears_a_torn_journal_tail() {
    let (img, want) = family_pool();
    let (n, _) = node_of(&trees(&img), |name, n| name == "vm-a" && n.level > 0);
    let (dev, pool) = open_rw(img);
    write_blocks(&pool, "vm-b", [0u64].into_iter(), 5);
    write_blocks(&pool, "vm-b", [1u64].into_iter(), 6);
    let mut img = dev.image();
    std::mem::forget(pool);
    // The newest journal block (highest sequence), torn.
    let last = (0..img.len() / BS)
        .filter_map(|at| journal_seq(&img[at * BS..(at + 1) * BS], at as u64).map(|s| (s, at)))
        .max()
        .unwrap()
        .1;
    img[last * BS + 100] ^= 0xff;
    damage(&mut img, &n, "zeroed", 0);
    let dev = Arc::new(MemDevice::from_image(img));
    let c = check(dev.as_ref(), "mem").unwrap();
    assert!(
        c.torn_journal_block.is_some() && c.damaged.len() == 1,
        "{c:?}"
    );
    let r = salvage(&dev, &["vm-a"], false);
    assert!(r.refused.is_empty(), "{r:?}");
    assert!(r.notes.iter().any(|n| n.contains("torn")), "{r:?}");
    let c = check(dev.as_ref(), "mem").unwrap();
    assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
    let now = state_of(&dev);
    let vm_b = now["vm-b"].as_ref().unwrap();
    assert_eq!(
        vm_b[..BS],
        pattern("vm-b", 0, 5)[..],
        "the first commit survives"
    );
    assert_eq!(
        vm_b[BS..2 * BS],
        want["vm-b"][BS..2 * BS],
        "the torn one is dropped"
    );
}

/// One bad copy of any node, first or second, of every kind of tree
/// (volume, snapshot, clone's own part, base shared by clones): nothing is
/// damaged, every volume reads back byte-identical, `check` warns about
/// exactly that copy, and a read-write open (first copy) or `repair`
/// (second copy, which an open does not read) rewrites it.
#[test]
fn one_bad_copy_of_any_node_is_covered_by_its_twin() {
    let (img, want) = family_pool();
    let mut nodes: Vec<NodeAt> = trees(&img).into_values().flatten().collect();
    nodes.sort_by_key(|n| n.block);
    nodes.dedup_by_key(|n| n.block);
    for n in &nodes {
        // What a misdirected write puts there: another node.
        let other = nodes.iter().find(|m| m.block != n.block).unwrap().block;
        for (bad, good) in [(n.block, n.twin), (n.twin, n.block)] {
            for how in ["bit flip", "zeroed", "misdirected"] {
                let what = format!("{how} in copy at block {bad} of the node at {}", n.block);
                let mut img = img.clone();
                damage_copy(
                    &mut img,
                    bad,
                    how,
                    if other == bad { n.block } else { other },
                );
                let dev = Arc::new(MemDevice::from_image(img.clone()));
                let report = check(dev.as_ref(), "mem").unwrap();
                assert!(report.errors.is_empty(), "{what}: {:?}", report.errors);
                assert_eq!(report.warnings.len(), 1, "{what}: {:?}", report.warnings);
                let w = &report.warnings[0];
                assert!(
                    w.contains(&format!("mapping node at block {bad}"))
                        && w.contains(&format!("using its twin at block {good}")),
                    "{what}: {w}"
                );
                let (dev, pool) = open_rw(img);
                assert_eq!(contents(&pool), want, "{what}");
                assert!(pool.volumes().iter().all(|v| v.damage.is_empty()), "{what}");
                pool.close().unwrap();
                if bad == n.twin {
                    let r = thinlun::repair::repair(dev.clone(), "mem", false).unwrap();
                    assert!(r.refused.is_empty(), "{what}: {:?}", r.refused);
                    assert!(
                        r.fixes.iter().any(|f| f.contains(&format!("block {bad}"))),
                        "{what}: {:?}",
                        r.fixes
                    );
                }
                let after = check(dev.as_ref(), "mem").unwrap();
                assert!(
                    after.is_clean() && after.warnings.is_empty(),
                    "{what}: {after:?}"
                );
                let (_, pool) = open_rw(dev.image());
                assert_eq!(contents(&pool), want, "{what}: after the rewrite");
            }
        }
    }
}
