//! Writes seed corpora for the fuzz targets: real records encoded with the
//! engine's own encoders, at the block addresses the targets decode at.
//!
//! Usage: cargo run --bin make_seeds [-- OUT_DIR]   (default: fuzz/corpus)
//! Writes OUT_DIR/<target>/seed-N and checks that every seed decodes.

use std::path::{Path, PathBuf};
use thinlun::format::catalog::{
    self, decode_catalog, decode_volume_header, encode_catalog, encode_volume_header, CatalogBlock,
    VolumeHeader, VolumeRecord, RECORDS_PER_BLOCK,
};
use thinlun::format::claims::{self, Claim, CLAIMS_PER_BLOCK};
use thinlun::format::journal::{
    decode_block, decode_host_checkpoint, encode_block, encode_host_checkpoint, Entry,
    HostCheckpoint, JournalBlock, ENTRIES_PER_BLOCK,
};
use thinlun::format::node::{self, Child, Extent, Node, NodeAddr, EXTENT_ZERO, NODE_CAPACITY};
use thinlun::format::superblock::{Policy, Superblock};
use thinlun::format::{Layout, SUPERBLOCK_B};
use thinlun_fuzz::{at, layout};

/// Pool uuid of the seed superblocks (and of the host checkpoint's seed).
const UUID: [u8; 16] = *b"\x3c\x1f\x8a\x02\x55\x90\x4e\x11\xa7\x0d\x62\xe4\x18\xbb\x09\x7f";

// The journal block the targets decode lies in host 1's ring.
const _: () = assert!(at::JOURNAL >= at::HOST_CHECKPOINT + 2);
const _: () = assert!(at::JOURNAL < at::HOST_CHECKPOINT + 2 + at::RING_LEN as u64);

fn write(dir: &Path, target: &str, seeds: &[Vec<u8>]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    for (i, s) in seeds.iter().enumerate() {
        let p = d.join(format!("seed-{i}"));
        std::fs::write(&p, s).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }
    println!("{}: {} seeds", d.display(), seeds.len());
}

fn superblocks() -> Vec<Vec<u8>> {
    let l = layout();
    // The fixed addresses the targets use must match the layout.
    assert_eq!(l.ag_table_start, at::CLAIMS);
    assert_eq!(l.host_region(1), at::HOST_CHECKPOINT);
    assert_eq!(l.data_start, at::CATALOG);
    assert!(l.is_data_block(at::VOLUME_HEADER) && l.is_data_block(at::NODE));
    assert_eq!(l.max_hosts, at::MAX_HOSTS);
    assert_eq!(l.journal_blocks - 2, at::RING_LEN);

    let fresh = Superblock {
        generation: 1,
        layout: l,
        uuid: UUID,
        catalog_root: 0,
        next_volume_id: 1,
        created_unix: 1_700_000_000,
        commit_unix: 1_700_000_000,
        policy: Policy::default(),
        shared: None,
        ditto_nodes: true,
    };
    let used = Superblock {
        generation: 42,
        catalog_root: at::CATALOG,
        next_volume_id: 17,
        commit_unix: 1_700_086_400,
        policy: Policy {
            data_warn_pct: [70, 85, 0],
            meta_warn_pct: [50, 0, 0],
            when_full: 1,
            queue_timeout_ms: 5_000,
            max_overcommit_pct: 400,
        },
        ..fresh.clone()
    };
    // Smallest geometry: 64 KiB chunks, one host, 64-block journal.
    let small = Superblock {
        layout: Layout::compute(4096, 4096, 16, 1, 64),
        ..fresh.clone()
    };
    // Largest addresses: a pool that may grow to 2^48 - 1 blocks, 1 GiB
    // chunks, 100 hosts, 8 MiB journals.
    let big = Superblock {
        layout: Layout::compute(1 << 40, (1 << 48) - 1, 1 << 18, 100, 2048),
        catalog_root: 0,
        ..used.clone()
    };
    let mut out = Vec::new();
    for sb in [&fresh, &used, &small, &big] {
        let b = sb.encode(at::SUPERBLOCK);
        assert_eq!(&Superblock::decode(&b, at::SUPERBLOCK).unwrap(), sb);
        out.push(b);
    }
    // Copy B: valid only once re-sealed at block 0.
    out.push(used.encode(SUPERBLOCK_B));
    out
}

fn nodes() -> Vec<Vec<u8>> {
    let leaf = Node::Leaf(vec![
        Extent {
            vblock: 0,
            pblock: 2048,
            len: 256,
            flags: 0,
        },
        Extent {
            vblock: 256,
            pblock: 0,
            len: 16,
            flags: EXTENT_ZERO,
        },
        Extent {
            vblock: 300,
            pblock: 4096,
            len: 1,
            flags: 0,
        },
        Extent {
            vblock: (1 << 48) - 65535,
            pblock: (1 << 48) - 65535,
            len: 65535,
            flags: 0,
        },
    ]);
    let full = Node::Leaf(
        (0..NODE_CAPACITY as u64)
            .map(|i| Extent {
                vblock: i * 3,
                pblock: 10_000 + i * 2,
                len: 2,
                flags: (i % 2) as u8,
            })
            .collect(),
    );
    let empty = Node::Leaf(Vec::new());
    let interior = Node::Interior {
        level: 1,
        children: vec![
            child(0, 1541, 0),
            child(4000, 1542, 0),
            child(90_000, 1543, 0),
        ],
    };
    let root = Node::Interior {
        level: 8,
        children: vec![child(0, 1600, 0)],
    };
    // A ditto interior node: 24-byte entries naming each child's twin.
    let ditto = Node::Interior {
        level: 2,
        children: vec![child(0, 1700, 9700), child(5000, 1701, 9701)],
    };
    let mut out = Vec::new();
    for (n, vol) in [
        (&leaf, 1),
        (&full, 2),
        (&empty, 3),
        (&interior, 1),
        (&root, 9),
    ] {
        let b = node::encode(n, vol, 7, at::NODE);
        assert_eq!(&node::decode(&b, at::NODE).unwrap(), n);
        out.push(b);
    }
    // Version-2 copies: the first copy at the targets' node address.
    for n in [&leaf, &ditto] {
        let twin = NodeAddr {
            block: at::NODE,
            twin: at::NODE + 4096,
        };
        let (at_block, b) = node::encode_copies(n, 4, 7, twin).remove(0);
        assert_eq!(&node::decode(&b, at_block).unwrap(), n);
        out.push(b);
    }
    out
}

fn child(key: u64, block: u64, twin: u64) -> Child {
    Child {
        key,
        at: NodeAddr { block, twin },
    }
}

fn catalogs() -> Vec<Vec<u8>> {
    let l = layout();
    let rec = |id: u64, name: &str, flags: u32| VolumeRecord {
        id,
        flags,
        name: name.into(),
        size_bytes: 8 << 30,
        header_blocks: [at::VOLUME_HEADER + 2 * id, at::VOLUME_HEADER + 2 * id + 1],
        parent_id: if flags & catalog::flags::SNAPSHOT != 0 {
            1
        } else {
            0
        },
        origin_id: 0,
        created_unix: 1_700_000_000 + id,
        active_host: if id == 1 { 1 } else { 0 },
        active_gen: if id == 1 { 1 } else { 0 },
    };
    let two = CatalogBlock {
        records: vec![
            rec(1, "vm-100-disk-0", 0),
            rec(
                2,
                "base-9000-disk-1",
                catalog::flags::BASE | catalog::flags::READ_ONLY,
            ),
        ],
        next: 0,
    };
    let full = CatalogBlock {
        records: (1..=RECORDS_PER_BLOCK as u64)
            .map(|i| {
                rec(
                    i,
                    &format!("vm-{i}-disk-0.snap_{}", "x".repeat(i as usize)),
                    catalog::flags::SNAPSHOT,
                )
            })
            .collect(),
        next: at::CATALOG + 100,
    };
    let long = CatalogBlock {
        records: vec![rec(3, &"n".repeat(128), 0)],
        next: 0,
    };
    let empty = CatalogBlock {
        records: Vec::new(),
        next: 0,
    };
    let mut out = Vec::new();
    for (i, cb) in [&two, &full, &long, &empty].into_iter().enumerate() {
        let b = encode_catalog(cb, 5 + i as u64, at::CATALOG);
        assert_eq!(&decode_catalog(&b, &l, at::CATALOG).unwrap(), cb);
        out.push(b);
    }
    let headers = [
        VolumeHeader {
            volume_id: 1,
            generation: 1,
            root: NodeAddr::NONE,
            depth: 0,
            mapped_blocks: 0,
            extent_count: 0,
            journal_seq: 0,
            journal_host: 1,
        },
        VolumeHeader {
            volume_id: 7,
            generation: 12,
            root: NodeAddr {
                block: at::NODE,
                twin: at::NODE + 4096,
            },
            depth: 2,
            mapped_blocks: 123_456,
            extent_count: 789,
            journal_seq: 4321,
            journal_host: 1,
        },
    ];
    for h in &headers {
        let b = encode_volume_header(h, at::VOLUME_HEADER);
        assert_eq!(&decode_volume_header(&b, at::VOLUME_HEADER).unwrap(), h);
        out.push(b);
    }
    out
}

fn journals() -> Vec<Vec<u8>> {
    let mixed = JournalBlock {
        seq: 1,
        commit_first: 1,
        boot: 0,
        nonce: 0x0123_4567_89ab_cdef,
        prev_crc: 0xdead_beef,
        entries: vec![
            Entry::Map {
                volume: 1,
                vblock: 0,
                pblock: 2048,
                len: 256,
            },
            Entry::Unmap {
                volume: 1,
                vblock: 100,
                len: 8,
            },
            Entry::Zero {
                volume: 2,
                vblock: 7,
                len: 1,
            },
            Entry::Map {
                volume: 3,
                vblock: (1 << 48) - 1,
                pblock: 1600,
                len: 1,
            },
            Entry::Unmap {
                volume: 3,
                vblock: 0,
                len: u32::MAX,
            },
        ],
    };
    let full = JournalBlock {
        seq: 99_999,
        commit_first: 99_999,
        boot: 0x5eed_b007,
        nonce: 7,
        prev_crc: 1,
        entries: (0..ENTRIES_PER_BLOCK as u64)
            .map(|i| Entry::Map {
                volume: 1 + i % 3,
                vblock: i * 10,
                pblock: 5000 + i,
                len: 1,
            })
            .collect(),
    };
    let empty = JournalBlock {
        seq: 2,
        commit_first: 2,
        boot: 0,
        nonce: 0,
        prev_crc: 0,
        entries: Vec::new(),
    };
    let mut out = Vec::new();
    for jb in [&mixed, &full, &empty] {
        let (b, crc) = encode_block(jb, at::JOURNAL);
        assert_eq!(
            decode_block(&b, at::JOURNAL).unwrap(),
            Some((jb.clone(), crc))
        );
        out.push(b);
    }
    // A new pool's checkpoint: head 0, seq 1, prev_crc = chain seed
    // (CRC32 of pool uuid || host id LE).
    let mut seed = crc32fast::Hasher::new();
    seed.update(&UUID);
    seed.update(&1u32.to_le_bytes());
    let ckpts = [
        HostCheckpoint {
            generation: 1,
            head: 0,
            seq: 1,
            prev_crc: seed.finalize(),
        },
        HostCheckpoint {
            generation: 9,
            head: at::RING_LEN - 1,
            seq: 5000,
            prev_crc: 0x1234_5678,
        },
    ];
    for h in &ckpts {
        let b = encode_host_checkpoint(h, at::HOST_CHECKPOINT);
        assert_eq!(
            &decode_host_checkpoint(&b, at::HOST_CHECKPOINT, at::RING_LEN).unwrap(),
            h
        );
        out.push(b);
    }
    out
}

fn claim_tables() -> Vec<Vec<u8>> {
    let empty = vec![Claim::default(); CLAIMS_PER_BLOCK];
    let some: Vec<Claim> = (0..CLAIMS_PER_BLOCK)
        .map(|i| Claim {
            owner: (i % (at::MAX_HOSTS as usize + 1)) as u16,
            generation: i as u64 * 3,
        })
        .collect();
    let mut out = Vec::new();
    for c in [&empty, &some] {
        let b = claims::encode(c, 1, at::CLAIMS);
        assert_eq!(&claims::decode(&b, at::CLAIMS, at::MAX_HOSTS).unwrap(), c);
        out.push(b);
    }
    out
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    write(&dir, "superblock", &superblocks());
    write(&dir, "node", &nodes());
    write(&dir, "catalog", &catalogs());
    write(&dir, "journal", &journals());
    write(&dir, "claims", &claim_tables());
    write(&dir, "virtio_request", &virtio_requests());
    write(&dir, "lease", &lease_sectors());
    write(&dir, "diffstream", &diff_streams());
    write(&dir, "nbd_handshake", &nbd_handshakes());
    write(&dir, "vhost_messages", &vhost_sessions());
}

/// What QEMU sends to start a device (in the target's input encoding:
/// op = request, flags, fd kind, length, payload): the handshake with
/// REPLY_ACK, a memory table on the guest memfd, queue 0 set up and
/// started, one read request in guest memory, a kick; then the same with
/// the memory truncated before the kick.
fn vhost_sessions() -> Vec<Vec<u8>> {
    fn msg(out: &mut Vec<u8>, req: u8, kind: u8, payload: &[u8]) {
        out.extend_from_slice(&[req, 0x8, kind, payload.len() as u8]);
        out.extend_from_slice(payload);
    }
    fn words(ws: &[u64], first32: &[u32]) -> Vec<u8> {
        let mut p = Vec::new();
        for w in first32 {
            p.extend_from_slice(&w.to_le_bytes());
        }
        for w in ws {
            p.extend_from_slice(&w.to_le_bytes());
        }
        p
    }
    fn put(out: &mut Vec<u8>, offset: u64, bytes: &[u8; 16]) {
        out.push(200);
        out.extend_from_slice(&((offset / 16) as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    }
    let uva = 0x7f00_0000_0000u64;
    let mut s = Vec::new();
    msg(&mut s, 1, 0, &[]);
    msg(&mut s, 3, 0, &[]);
    msg(&mut s, 2, 0, &((1u64 << 30) | (1 << 32)).to_le_bytes());
    msg(&mut s, 15, 0, &[]);
    msg(&mut s, 16, 0, &0xbu64.to_le_bytes()); // MQ, LOG_SHMFD, REPLY_ACK
    msg(&mut s, 5, 1, &words(&[0, 1 << 20, uva, 0], &[1, 0]));
    msg(&mut s, 8, 0, &words(&[], &[0, 16]));
    msg(
        &mut s,
        9,
        0,
        &words(&[uva, uva + 0x2000, uva + 0x1000, 0], &[0, 0]),
    );
    msg(&mut s, 10, 0, &words(&[], &[0, 0]));
    msg(&mut s, 13, 3, &0u64.to_le_bytes());
    msg(&mut s, 12, 3, &0u64.to_le_bytes());
    msg(&mut s, 18, 0, &words(&[], &[0, 1]));
    // A 4 KiB read of sector 0: header at 0x4000 (type 0 = zeros there),
    // data at 0x5000, status at 0x6000; the avail ring at 0x1000 offers
    // head 0 (idx 1).
    put(&mut s, 0, &desc(0x4000, 16, 1, 1));
    put(&mut s, 16, &desc(0x5000, 4096, 3, 2));
    put(&mut s, 32, &desc(0x6000, 1, 2, 0));
    let mut avail = [0u8; 16];
    avail[2..4].copy_from_slice(&1u16.to_le_bytes());
    put(&mut s, 0x1000, &avail);
    s.push(255); // kick
    msg(&mut s, 1, 0, &[]);
    let mut truncated = s.clone();
    truncated.extend_from_slice(&[220, 0, 255]);
    vec![s, truncated]
}

/// What QEMU and nbdinfo send: client flags, then STRUCTURED_REPLY,
/// SET_META_CONTEXT base:allocation, LIST, INFO and GO for "vm".
fn nbd_handshakes() -> Vec<Vec<u8>> {
    fn opt(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        out.extend_from_slice(b"IHAVEOPT");
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut name = 2u32.to_be_bytes().to_vec();
    name.extend_from_slice(b"vm");
    let mut info = name.clone();
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&3u16.to_be_bytes());
    let mut meta = name.clone();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    let mut full = 3u32.to_be_bytes().to_vec();
    opt(&mut full, 8, &[]);
    opt(&mut full, 10, &meta);
    opt(&mut full, 9, &meta);
    opt(&mut full, 3, &[]);
    opt(&mut full, 6, &info);
    opt(&mut full, 7, &info);
    let mut old = 1u32.to_be_bytes().to_vec();
    opt(&mut old, 1, b"vm");
    let mut abort = 3u32.to_be_bytes().to_vec();
    opt(&mut abort, 2, &[]);
    vec![full, old, abort]
}

/// A live and a free host slot, and a lock register choosing and holding.
fn lease_sectors() -> Vec<Vec<u8>> {
    use thinlun::format::lease::{HostSlot, LockRegister, SlotState};
    let slot = |state| HostSlot {
        host_id: 1,
        state,
        generation: 3,
        nonce: 0x1234_5678_9abc_def0,
        renewal: 42,
        local_ms: 123_456,
        name: "hv-01".into(),
    };
    let reg = |choosing, number| LockRegister {
        host_id: 1,
        host_generation: 3,
        choosing,
        number,
    };
    vec![
        slot(SlotState::Live).encode(at::HOST_SLOT),
        slot(SlotState::Free).encode(at::HOST_SLOT),
        reg(true, 0).encode(at::LOCK_REGISTER),
        reg(false, 7).encode(at::LOCK_REGISTER),
    ]
}

/// A full stream and an incremental one, as export-diff writes them.
fn diff_streams() -> Vec<Vec<u8>> {
    use thinlun::diffstream::{DiffHeader, DiffWriter};
    let mut out = Vec::new();
    for (from, to) in [("", "s1"), ("s1", "s2")] {
        let mut buf = Vec::new();
        let h = DiffHeader {
            size_bytes: 1 << 20,
            from: from.into(),
            to: to.into(),
        };
        let mut w = DiffWriter::new(&mut buf, &h).expect("header");
        w.data(0, &[7u8; 4096]).expect("data");
        w.zero(8192, 8192).expect("zero");
        w.data(65536, &[9u8; 1024]).expect("data");
        w.finish().expect("finish");
        out.push(buf);
    }
    out
}

/// Real virtio-blk requests as a guest driver lays them out: header in the
/// first readable descriptor (or split over two), data, status byte last.
fn virtio_requests() -> Vec<Vec<u8>> {
    use thinlun_fuzz::virtio;
    use thinlun_vhost::request::{parse, req_type, Command, Limits};
    let lim = Limits {
        capacity: 1 << 21,
        max_discard_sectors: 1 << 16,
        max_discard_seg: 32,
        max_write_zeroes_sectors: 1 << 16,
        max_write_zeroes_seg: 32,
        max_transfer: 1 << 20,
    };
    let header = |t: u32, sector: u64| {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    };
    let range = |sector: u64, sectors: u32, flags: u32| {
        let mut r = Vec::new();
        r.extend_from_slice(&sector.to_le_bytes());
        r.extend_from_slice(&sectors.to_le_bytes());
        r.extend_from_slice(&flags.to_le_bytes());
        r
    };
    // (descriptors as (offset, len, device-writable), guest memory)
    type Seed = (Vec<(u16, u16, bool)>, Vec<u8>);
    let seeds: Vec<Seed> = vec![
        // Read 4 KiB at sector 8 into one buffer.
        (
            vec![(0, 16, false), (0x1000, 4096, true), (0x3000, 1, true)],
            header(req_type::IN, 8),
        ),
        // Read into two buffers, the status byte at the end of the second.
        (
            vec![(0, 16, false), (0x1000, 512, true), (0x2000, 1025, true)],
            header(req_type::IN, 0),
        ),
        // Write 8 KiB from two buffers.
        (
            vec![
                (0, 16, false),
                (0x1000, 4096, false),
                (0x2000, 4096, false),
                (0x3000, 1, true),
            ],
            header(req_type::OUT, 2040),
        ),
        // Write with header and data in one descriptor.
        (
            vec![(0, 16 + 512, false), (0x3000, 1, true)],
            header(req_type::OUT, 1),
        ),
        // Header split over two descriptors.
        (
            vec![(0, 8, false), (8, 8, false), (0x3000, 1, true)],
            header(req_type::FLUSH, 0),
        ),
        (
            vec![(0, 16, false), (0x3000, 1, true)],
            header(req_type::FLUSH, 0),
        ),
        (
            vec![(0, 16, false), (0x1000, 20, true), (0x3000, 1, true)],
            header(req_type::GET_ID, 0),
        ),
        (
            vec![(0, 16, false), (16, 32, false), (0x3000, 1, true)],
            [
                header(req_type::DISCARD, 0),
                range(0, 8, 0),
                range(64, 128, 0),
            ]
            .concat(),
        ),
        (
            vec![(0, 32, false), (0x3000, 1, true)],
            [header(req_type::WRITE_ZEROES, 0), range(16, 2048, 1)].concat(),
        ),
    ];
    seeds
        .into_iter()
        .map(|(descs, mem)| {
            let b = virtio::encode(&lim, &descs, &mem);
            let input = virtio::decode(&b);
            let parsed = parse(&input.descs, &input.mem, &input.limits)
                .unwrap_or_else(|_| panic!("seed {descs:?} has no status byte"));
            assert!(
                matches!(parsed.cmd, Ok(ref c) if !matches!(c, Command::GetId { segs } if segs.is_empty())),
                "seed {descs:?} does not parse: {:?}",
                parsed.cmd
            );
            b
        })
        .collect()
}
