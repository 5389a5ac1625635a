//! The vhost-user-blk server through a real vhost-user front end without a
//! VM: the `virtio-driver` crate's vhost-user transport drives split
//! virtqueues in shared memory, exactly as QEMU's device model would.
//!
//! Requests are built descriptor by descriptor (not through the crate's
//! virtio-blk helpers) so malformed chains, unknown types and GET_ID can be
//! sent too.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thinlun::{Pool, PoolConfig, Volume};
use thinlun_vhost::{ServeOptions, Server, StopHandle};

mod common;
use common::vhost::*;

/// A pool with one volume, served on a socket from a thread.
struct Served {
    pool: Option<Pool>,
    vol: Arc<Volume>,
    stop: StopHandle,
    thread: Option<JoinHandle<Server>>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(pool_mb: u64, vol_mb: u64, configure: impl FnOnce(&mut ServeOptions)) -> Served {
        // The server's messages (a failed request says why only there) go
        // to the test's captured output.
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .is_test(true)
            .try_init();
        let dir = scratch("client");
        let cfg = PoolConfig {
            size_bytes: Some(pool_mb << 20),
            ..PoolConfig::default()
        };
        let pool = Pool::create_path(&dir.path().join("pool.img"), &cfg).unwrap();
        pool.create_volume("vm-1", vol_mb << 20).unwrap();
        let vol = Arc::new(pool.open_volume("vm-1").unwrap());
        let sock = dir.path().join("vhost.sock");
        let mut opts = ServeOptions::new(&sock, "vm-1");
        opts.opt_io_bytes = pool.status().chunk_bytes;
        configure(&mut opts);
        let mut server = Server::new(vol.clone(), &opts).unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            server.run().unwrap();
            server
        });
        Served {
            pool: Some(pool),
            vol,
            stop,
            thread: Some(thread),
            sock,
            _dir: dir,
        }
    }

    fn mapped_bytes(&self) -> u64 {
        self.pool
            .as_ref()
            .unwrap()
            .volume_info("vm-1")
            .unwrap()
            .mapped_bytes
    }

    /// Stops the server; returns it for its counters.
    fn stop(&mut self) -> Server {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
        if let Some(pool) = self.pool.take() {
            let _ = self.vol.flush();
            pool.close().unwrap();
        }
    }
}

#[test]
fn features_and_config_space() {
    let s = Served::start(256, 64, |o| {
        o.num_queues = 2;
        o.block_size = 4096;
    });
    let c = Client::connect(&s.sock, 2);
    let f = c.features();
    for (name, bit) in [
        ("VERSION_1", 32),
        ("EVENT_IDX", 29),
        ("SEG_MAX", 2),
        ("SIZE_MAX", 1),
        ("BLK_SIZE", 6),
        ("FLUSH", 9),
        ("TOPOLOGY", 10),
        ("CONFIG_WCE", 11),
        ("MQ", 12),
        ("DISCARD", 13),
        ("WRITE_ZEROES", 14),
    ] {
        assert!(f & (1u64 << bit) != 0, "feature {name} not negotiated");
    }
    assert_eq!(f & (1 << 5), 0, "RO offered on a writable volume");
    let b = c.config();
    assert_eq!(
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        (64 << 20) / 512
    );
    assert_eq!(le32(&b, 20), 4096, "blk_size");
    assert_eq!(
        le32(&b, 28),
        256,
        "opt_io_size: 1 MiB chunk in 4 KiB blocks"
    );
    assert_eq!(b[32], 1, "writeback");
    assert_eq!(u16::from_le_bytes([b[34], b[35]]), 2, "num_queues");
    assert!(le32(&b, 36) > 0 && le32(&b, 40) > 0, "discard limits");
    assert_eq!(le32(&b, 44), 8, "discard alignment");
    assert!(le32(&b, 48) > 0 && le32(&b, 52) > 0, "write-zeroes limits");
    assert_eq!(b[56], 1, "write_zeroes_may_unmap");

    // Growth while served: the configuration reports the new capacity and
    // I/O past the old end works.
    s.pool
        .as_ref()
        .unwrap()
        .resize_volume("vm-1", 128 << 20, false)
        .unwrap();
    let b = c.config();
    assert_eq!(
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        (128 << 20) / 512
    );
    let mut c = c;
    c.data(0, 4096).copy_from_slice(&pattern(8, 4096));
    assert_eq!(c.write((100 << 20) / 512, 0, 4096), S_OK);
}

#[test]
fn reads_writes_flush_and_batches() {
    let mut s = Served::start(256, 64, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    // Unwritten space reads as zeros.
    c.data(0, 8192).fill(0xaa);
    assert_eq!(c.read(0, 0, 8192), S_OK);
    zeros(c.data(0, 8192), "unwritten");

    // A batch of 32 writes in one kick, each 8 KiB, 512-aligned only: they
    // do not overlap but most share a 4 KiB block with a neighbour.
    let mut ids = Vec::new();
    for i in 0..32usize {
        let p = pattern(i as u64, 8192);
        c.data(i * 8192, 8192).copy_from_slice(&p);
        let sector = (i as u64) * 17;
        ids.push(c.add(
            0,
            T_OUT,
            sector,
            &[],
            &[
                Part::Header(16),
                Part::Data(i * 8192, 4096, false),
                Part::Data(i * 8192 + 4096, 4096, false),
                Part::Status,
            ],
        ));
    }
    let done = c.run(0, &ids);
    let order: Vec<u16> = done.iter().map(|d| d.0).collect();
    assert_eq!(order, ids, "completed in submission order");
    assert!(done.iter().all(|d| d.1.status == S_OK));
    assert_eq!(
        c.one(T_FLUSH, 0, &[], &[Part::Header(16), Part::Status]),
        S_OK
    );

    // The expected image: every write, with a one-sector gap between.
    let mut image = vec![0u8; 32 * 17 * 512 + 8192];
    for i in 0..32usize {
        let at = i * 17 * 512;
        image[at..at + 8192].copy_from_slice(&pattern(i as u64, 8192));
    }
    let len = image.len().div_ceil(4096) * 4096;
    assert_eq!(c.read(0, 1 << 20, len), S_OK);
    same(c.data(1 << 20, image.len()), &image, "batch of 32 writes");

    // Odd segment sizes go through bounce buffers: 1000 + 24 bytes.
    let p = pattern(99, 1024);
    c.data(0, 1024).copy_from_slice(&p);
    let st = c.one(
        T_OUT,
        4000,
        &[],
        &[
            Part::Header(16),
            Part::Data(0, 1000, false),
            Part::Data(1000, 24, false),
            Part::Status,
        ],
    );
    assert_eq!(st, S_OK);
    c.data(4096, 1024).fill(0);
    let st = c.one(
        T_IN,
        4000,
        &[],
        &[
            Part::Header(16),
            Part::Data(4096, 24, true),
            Part::Data(4096 + 24, 1000, true),
            Part::Status,
        ],
    );
    assert_eq!(st, S_OK);
    same(c.data(4096, 1024), &p, "bounced");

    // The data is in the volume, as the engine sees it.
    let mut buf = vec![0u8; 1024];
    s.vol.read(4000, &mut buf).unwrap();
    assert_eq!(buf, p);
    drop(c);
    let server = s.stop();
    let st = server.stats();
    assert!(st.batches < st.requests, "requests were batched: {st:?}");
    assert!(
        st.max_batch >= 8,
        "a kick of 32 requests ran as one batch: {st:?}"
    );
}

/// A front end that keeps 32 requests in flight, as fio or a guest under
/// load does: as each completes, another is queued. Random 4 KiB reads
/// and writes, never two in flight on one block, against a model of the
/// volume. Completions must arrive in the order the requests were queued
/// (what lets a restarted server resume at the used index), and every
/// read must see the last completed write.
#[test]
fn a_full_queue_keeps_flowing_in_order() {
    const DEPTH: usize = 32;
    const BLOCKS: u64 = 256;
    const REQUESTS: u64 = 4000;
    let mut s = Served::start(64, 16, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    let mut rng = thinlun_tests::Rng::with_seed(0x5eed_f10e);
    // What each block holds (the seed of its pattern; 0: zeros), and the
    // requests in flight: (id, block, data slot, write seed or None).
    let mut model = vec![0u64; BLOCKS as usize];
    let mut in_flight: std::collections::VecDeque<(u16, u64, usize, Option<u64>)> =
        Default::default();
    let mut free_slots: Vec<usize> = (0..DEPTH).collect();
    let (mut queued, mut completed) = (0u64, 0u64);
    while completed < REQUESTS {
        while queued < REQUESTS && in_flight.len() < DEPTH {
            let block = loop {
                let b = rng.u64(..BLOCKS);
                if !in_flight.iter().any(|r| r.1 == b) {
                    break b;
                }
            };
            let slot = free_slots.pop().unwrap();
            let off = slot * 4096;
            let seed = (rng.u64(..2) == 0).then_some(queued + 1);
            let id = if let Some(seed) = seed {
                c.data(off, 4096).copy_from_slice(&pattern(seed, 4096));
                let parts = [Part::Header(16), Part::Data(off, 4096, false), Part::Status];
                c.add(0, T_OUT, block * 8, &[], &parts)
            } else {
                c.data(off, 4096).fill(0xaa);
                let parts = [Part::Header(16), Part::Data(off, 4096, true), Part::Status];
                c.add(0, T_IN, block * 8, &[], &parts)
            };
            in_flight.push_back((id, block, slot, seed));
            queued += 1;
        }
        c.kick(0);
        for (id, req) in c.wait_any(0) {
            let (want_id, block, slot, seed) = in_flight.pop_front().unwrap();
            assert_eq!(id, want_id, "completion {completed} out of order");
            assert_eq!(req.status, S_OK, "request {completed}");
            match seed {
                Some(seed) => model[block as usize] = seed,
                None => match model[block as usize] {
                    0 => zeros(c.data(slot * 4096, 4096), "unwritten block"),
                    seed => same(c.data(slot * 4096, 4096), &pattern(seed, 4096), "read"),
                },
            }
            free_slots.push(slot);
            completed += 1;
        }
    }
    drop(c);
    let st = s.stop().stats();
    assert_eq!(st.requests, REQUESTS, "{st:?}");
    assert_eq!(st.streamed, REQUESTS, "reads and writes stream: {st:?}");
    // Everything written is in the volume, as the engine sees it.
    let mut buf = vec![0u8; 4096];
    for (b, &seed) in model.iter().enumerate() {
        s.vol.read(b as u64 * 8, &mut buf).unwrap();
        match seed {
            0 => zeros(&buf, "unwritten block, engine"),
            seed => same(&buf, &pattern(seed, 4096), "engine"),
        }
    }
}

/// The same full queue with every kind of request mixed in: reads and
/// writes of one or two segments (streamed), 512-byte writes (the engine's
/// read-modify-write), write-zeroes, discards and flushes (batches that
/// wait for everything before them). Completions stay in order and every
/// read sees exactly what the requests before it left.
#[test]
fn a_full_queue_of_mixed_requests_stays_in_order() {
    const DEPTH: usize = 32;
    const BLOCKS: u64 = 128;
    const REQUESTS: u64 = 3000;
    let mut s = Served::start(64, 16, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    let mut rng = thinlun_tests::Rng::with_seed(0x0dd5_eed5);
    let mut model = vec![0u8; (BLOCKS * 4096) as usize];
    // In flight: (id, block or None for a flush, data slot, expected read bytes).
    type InFlight = (u16, Option<u64>, usize, Option<Vec<u8>>);
    let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
    let mut free_slots: Vec<usize> = (0..DEPTH).collect();
    let (mut queued, mut completed) = (0u64, 0u64);
    let at = |b: u64| (b * 4096) as usize;
    while completed < REQUESTS {
        while queued < REQUESTS && in_flight.len() < DEPTH {
            let block = loop {
                let b = rng.u64(..BLOCKS);
                if !in_flight.iter().any(|r| r.1 == Some(b)) {
                    break b;
                }
            };
            let slot = free_slots.pop().unwrap();
            let off = slot * 4096;
            let kind = rng.u64(..20);
            let (id, block, expect) = match kind {
                0..=6 => {
                    let data = pattern(queued + 1, 4096);
                    c.data(off, 4096).copy_from_slice(&data);
                    model[at(block)..at(block + 1)].copy_from_slice(&data);
                    let parts = if kind == 6 {
                        [
                            Part::Header(16),
                            Part::Data(off, 2048, false),
                            Part::Data(off + 2048, 2048, false),
                            Part::Status,
                        ]
                        .to_vec()
                    } else {
                        [Part::Header(16), Part::Data(off, 4096, false), Part::Status].to_vec()
                    };
                    (c.add(0, T_OUT, block * 8, &[], &parts), Some(block), None)
                }
                7..=13 => {
                    c.data(off, 4096).fill(0xaa);
                    let parts = if kind == 13 {
                        [
                            Part::Header(16),
                            Part::Data(off, 2048, true),
                            Part::Data(off + 2048, 2048, true),
                            Part::Status,
                        ]
                        .to_vec()
                    } else {
                        [Part::Header(16), Part::Data(off, 4096, true), Part::Status].to_vec()
                    };
                    let expect = model[at(block)..at(block + 1)].to_vec();
                    (
                        c.add(0, T_IN, block * 8, &[], &parts),
                        Some(block),
                        Some(expect),
                    )
                }
                14 | 15 => {
                    // One sector somewhere in the block.
                    let k = rng.u64(..8);
                    let data = pattern(queued + 1, 512);
                    c.data(off, 512).copy_from_slice(&data);
                    let o = at(block) + (k * 512) as usize;
                    model[o..o + 512].copy_from_slice(&data);
                    let parts = [Part::Header(16), Part::Data(off, 512, false), Part::Status];
                    (
                        c.add(0, T_OUT, block * 8 + k, &[], &parts),
                        Some(block),
                        None,
                    )
                }
                16 | 17 => {
                    let rtype = if kind == 16 {
                        T_WRITE_ZEROES
                    } else {
                        T_DISCARD
                    };
                    let mut extra = Vec::new();
                    extra.extend_from_slice(&(block * 8).to_le_bytes());
                    extra.extend_from_slice(&8u32.to_le_bytes());
                    extra.extend_from_slice(&u32::from(kind == 16).to_le_bytes());
                    model[at(block)..at(block + 1)].fill(0);
                    let parts = [Part::Header(16), Part::Extra(16, false), Part::Status];
                    (c.add(0, rtype, 0, &extra, &parts), Some(block), None)
                }
                _ => {
                    let parts = [Part::Header(16), Part::Status];
                    (c.add(0, T_FLUSH, 0, &[], &parts), None, None)
                }
            };
            in_flight.push_back((id, block, slot, expect));
            queued += 1;
        }
        c.kick(0);
        for (id, req) in c.wait_any(0) {
            let (want_id, _, slot, expect) = in_flight.pop_front().unwrap();
            assert_eq!(id, want_id, "completion {completed} out of order");
            assert_eq!(req.status, S_OK, "request {completed}");
            if let Some(want) = expect {
                same(c.data(slot * 4096, 4096), &want, "read");
            }
            free_slots.push(slot);
            completed += 1;
        }
    }
    drop(c);
    let st = s.stop().stats();
    assert_eq!(st.requests, REQUESTS, "{st:?}");
    assert!(st.streamed > REQUESTS / 2 && st.batches > 0, "{st:?}");
    let mut buf = vec![0u8; model.len()];
    s.vol.read(0, &mut buf).unwrap();
    same(&buf, &model, "engine");
}

/// Writes the server completed survive its crash (default durability): a
/// copy of the LUN taken right after the last completion, as a `kill -9`
/// leaves it, opens with every block the front end was told is written,
/// though no FLUSH was sent.
#[test]
fn completed_writes_survive_a_server_crash() {
    const DEPTH: usize = 32;
    const BLOCKS: u64 = 512;
    let s = Served::start(64, 16, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    let mut order: Vec<u64> = (0..BLOCKS).collect();
    let mut rng = thinlun_tests::Rng::with_seed(0xc4a5_4ed0);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.u64(..i as u64 + 1) as usize);
    }
    let mut in_flight: std::collections::VecDeque<(u16, usize)> = Default::default();
    let mut free_slots: Vec<usize> = (0..DEPTH).collect();
    let mut next = order.iter();
    let mut completed = 0;
    while completed < BLOCKS {
        while in_flight.len() < DEPTH {
            let Some(&b) = next.next() else { break };
            let slot = free_slots.pop().unwrap();
            c.data(slot * 4096, 4096)
                .copy_from_slice(&pattern(b + 1, 4096));
            let parts = [
                Part::Header(16),
                Part::Data(slot * 4096, 4096, false),
                Part::Status,
            ];
            in_flight.push_back((c.add(0, T_OUT, b * 8, &[], &parts), slot));
        }
        c.kick(0);
        for (id, req) in c.wait_any(0) {
            let (want, slot) = in_flight.pop_front().unwrap();
            assert_eq!((id, req.status), (want, S_OK));
            free_slots.push(slot);
            completed += 1;
        }
    }
    let crashed = s._dir.path().join("crashed.img");
    std::fs::copy(s._dir.path().join("pool.img"), &crashed).unwrap();
    let pool = Pool::open_path(&crashed, &thinlun::OpenOptions::default()).unwrap();
    let vol = pool.open_volume("vm-1").unwrap();
    let mut buf = vec![0u8; 4096];
    for b in 0..BLOCKS {
        vol.read(b * 8, &mut buf).unwrap();
        same(
            &buf,
            &pattern(b + 1, 4096),
            "a completed write after the crash",
        );
    }
}

#[test]
fn discard_and_write_zeroes() {
    let s = Served::start(256, 64, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    let p = pattern(7, 1 << 20);
    c.data(0, 1 << 20).copy_from_slice(&p);
    for i in 0..4u64 {
        assert_eq!(c.write(i * 2048, 0, 1 << 20), S_OK);
    }
    assert_eq!(s.mapped_bytes(), 4 << 20);

    // Discard the first MiB: unmapped, reads zeros.
    assert_eq!(c.ranges(T_DISCARD, &[(0, 2048, 0)]), S_OK);
    assert_eq!(s.mapped_bytes(), 3 << 20);
    assert_eq!(c.read(0, 2 << 20, 1 << 20), S_OK);
    zeros(c.data(2 << 20, 1 << 20), "discarded/zeroed");

    // Write-zeroes with UNMAP frees the space; two ranges in one request.
    assert_eq!(
        c.ranges(T_WRITE_ZEROES, &[(2048, 1024, 1), (3072, 1024, 1)]),
        S_OK
    );
    assert_eq!(s.mapped_bytes(), 2 << 20);
    assert_eq!(c.read(2048, 2 << 20, 1 << 20), S_OK);
    zeros(c.data(2 << 20, 1 << 20), "discarded/zeroed");

    // Without UNMAP the range stays allocated and reads zeros; a partial
    // block (sectors 4097..4100) is zeroed exactly.
    assert_eq!(
        c.ranges(
            T_WRITE_ZEROES,
            &[(4096, 1, 0), (4097, 3, 0), (4104, 1024, 0)]
        ),
        S_OK
    );
    assert_eq!(s.mapped_bytes(), 2 << 20);
    assert_eq!(c.read(4096, 2 << 20, 1 << 20), S_OK);
    let got = c.data(2 << 20, 1 << 20);
    zeros(&got[..4 * 512], "zeroed sectors 4096..4100");
    same(
        &got[4 * 512..8 * 512],
        &p[4 * 512..8 * 512],
        "kept sectors 4100..4104",
    );
    zeros(&got[8 * 512..1032 * 512], "zeroed sectors 4104..5128");
    same(&got[1032 * 512..], &p[1032 * 512..], "kept tail");

    // Write-zeroes with UNMAP on unaligned edges: the partial blocks are
    // written with zeros, the whole ones unmapped.
    assert_eq!(c.ranges(T_WRITE_ZEROES, &[(6144 + 3, 2040, 1)]), S_OK);
    assert_eq!(c.read(6144, 2 << 20, 1 << 20), S_OK);
    let got = c.data(2 << 20, 1 << 20);
    same(&got[..3 * 512], &p[..3 * 512], "kept head");
    zeros(&got[3 * 512..2043 * 512], "zeroed middle");
    same(&got[2043 * 512..], &p[2043 * 512..], "kept tail");

    // Unsupported flags: UNMAP on a discard, unknown bits anywhere.
    assert_eq!(c.ranges(T_DISCARD, &[(0, 8, 1)]), S_UNSUPP);
    assert_eq!(c.ranges(T_WRITE_ZEROES, &[(0, 8, 4)]), S_UNSUPP);
    assert_eq!(c.ranges(T_DISCARD, &[(0, 8, 0x8000_0000)]), S_UNSUPP);
}

#[test]
fn out_of_range_malformed_and_unknown_requests() {
    let s = Served::start(256, 64, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    let end = (64u64 << 20) / 512;
    c.data(0, 8192).copy_from_slice(&pattern(1, 8192));
    assert_eq!(c.write(end - 8, 0, 4096), S_OK, "last block");
    assert_eq!(c.write(end - 4, 0, 4096), S_IOERR, "crosses the end");
    assert_eq!(c.write(end, 0, 512), S_IOERR, "starts at the end");
    assert_eq!(c.read(end - 1, 0, 1024), S_IOERR);
    assert_eq!(c.read(u64::MAX - 1, 0, 4096), S_IOERR, "sector overflow");
    assert_eq!(c.ranges(T_DISCARD, &[(end - 8, 16, 0)]), S_IOERR);
    assert_eq!(c.ranges(T_WRITE_ZEROES, &[(end, 8, 1)]), S_IOERR);
    // Not whole sectors.
    assert_eq!(c.read(0, 0, 100), S_IOERR);
    assert_eq!(c.write(0, 0, 4095), S_IOERR);
    // Unknown types: SCSI, GET_LIFETIME, SECURE_ERASE, anything.
    for t in [2u32, 10, 14, 0x7fff_ffff] {
        assert_eq!(
            c.one(t, 0, &[], &[Part::Header(16), Part::Status]),
            S_UNSUPP,
            "type {t}"
        );
    }
    // Short header; data on a flush; readable data on a read.
    assert_eq!(
        c.one(
            T_IN,
            0,
            &[],
            &[Part::Header(8), Part::Data(0, 512, true), Part::Status]
        ),
        S_IOERR
    );
    assert_eq!(
        c.one(
            T_FLUSH,
            0,
            &[],
            &[Part::Header(16), Part::Data(0, 512, false), Part::Status]
        ),
        S_IOERR
    );
    assert_eq!(
        c.one(
            T_IN,
            0,
            &[],
            &[
                Part::Header(16),
                Part::Data(0, 512, false),
                Part::Data(512, 512, true),
                Part::Status
            ]
        ),
        S_IOERR
    );
    // Ranges that are not a whole number of 16-byte entries.
    assert_eq!(
        c.one(
            T_DISCARD,
            0,
            &[0; 24],
            &[Part::Header(16), Part::Extra(24, false), Part::Status]
        ),
        S_IOERR
    );
    // No status byte at all: completed, nothing written back.
    let id = c.add(
        0,
        T_OUT,
        0,
        &[],
        &[Part::Header(16), Part::Data(0, 512, false)],
    );
    let done = c.run(0, &[id]);
    assert_eq!(done[0].1.status, UNTOUCHED);
    // The device still works, and nothing above changed the data.
    assert_eq!(c.read(end - 8, 4096, 4096), S_OK);
    same(c.data(4096, 4096), &pattern(1, 8192)[..4096], "last block");

    // GET_ID: the serial, NUL-padded.
    let id = c.add(
        0,
        T_GET_ID,
        0,
        &[],
        &[Part::Header(16), Part::Extra(20, true), Part::Status],
    );
    let done = c.run(0, &[id]);
    assert_eq!(done[0].1.status, S_OK);
    assert_eq!(
        &done[0].1.extra[..20],
        b"vm-1\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let s = Served::start(256, 64, |o| o.read_only = true);
    s.vol.write(0, &pattern(5, 4096)).unwrap();
    let mapped = s.mapped_bytes();
    let mut c = Client::connect(&s.sock, 1);
    assert!(c.features() & (1 << 5) != 0, "RO negotiated");
    c.data(0, 4096).fill(0x55);
    assert_eq!(c.write(0, 0, 4096), S_IOERR);
    assert_eq!(c.write(64, 0, 4096), S_IOERR);
    assert_eq!(c.ranges(T_DISCARD, &[(0, 8, 0)]), S_IOERR);
    assert_eq!(c.ranges(T_WRITE_ZEROES, &[(0, 8, 1)]), S_IOERR);
    assert_eq!(
        c.one(T_FLUSH, 0, &[], &[Part::Header(16), Part::Status]),
        S_OK
    );
    assert_eq!(c.read(0, 8192, 4096), S_OK);
    same(c.data(8192, 4096), &pattern(5, 4096), "read-only data");
    assert_eq!(s.mapped_bytes(), mapped, "nothing written");
}

#[test]
fn out_of_space_fails_only_the_allocating_request() {
    // A pool far smaller than its volume.
    let s = Served::start(64, 256, |_| {});
    let mut c = Client::connect(&s.sock, 1);
    c.data(0, 1 << 20).copy_from_slice(&pattern(3, 1 << 20));
    assert_eq!(c.write(0, 0, 1 << 20), S_OK);
    let mut failed_at = None;
    for i in 1..256u64 {
        if c.write(i * 2048, 0, 1 << 20) != S_OK {
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("the pool filled up");
    assert!(failed_at > 4, "some space was usable");
    // A batch mixing an overwrite of mapped data and a first write: only
    // the first write fails.
    c.data(1 << 20, 4096).copy_from_slice(&pattern(4, 4096));
    let a = c.add(
        0,
        T_OUT,
        0,
        &[],
        &[
            Part::Header(16),
            Part::Data(1 << 20, 4096, false),
            Part::Status,
        ],
    );
    let b = c.add(
        0,
        T_OUT,
        255 * 2048,
        &[],
        &[
            Part::Header(16),
            Part::Data(0, 1 << 20, false),
            Part::Status,
        ],
    );
    let done = c.run(0, &[a, b]);
    assert_eq!(done[0].1.status, S_OK);
    assert_eq!(done[1].1.status, S_IOERR);
    assert_eq!(c.read(0, 2 << 20, 4096), S_OK);
    same(c.data(2 << 20, 4096), &pattern(4, 4096), "overwrite");
}

#[test]
fn reconnect_and_multiple_queues() {
    let mut s = Served::start(256, 64, |o| o.num_queues = 2);
    {
        let mut c = Client::connect(&s.sock, 2);
        for q in 0..2 {
            let mut ids = Vec::new();
            for i in 0..16usize {
                let k = q * 16 + i;
                c.data(k * 4096, 4096)
                    .copy_from_slice(&pattern(k as u64 + 100, 4096));
                ids.push(c.add(
                    q,
                    T_OUT,
                    k as u64 * 8,
                    &[],
                    &[
                        Part::Header(16),
                        Part::Data(k * 4096, 4096, false),
                        Part::Status,
                    ],
                ));
            }
            assert!(c.run(q, &ids).iter().all(|d| d.1.status == S_OK));
        }
        // Disconnect without any goodbye, as a killed QEMU would.
    }
    // The server listens again: a new front end sees the data.
    let mut c = Client::connect(&s.sock, 2);
    assert_eq!(c.read(0, 1 << 20, 32 * 4096), S_OK);
    for k in 0..32usize {
        assert_eq!(
            &c.data((1 << 20) + k * 4096, 4096)[..],
            &pattern(k as u64 + 100, 4096)[..],
            "block {k}"
        );
    }
    drop(c);
    let server = s.stop();
    assert_eq!(server.connections(), 2);
    drop(server);
    assert!(!s.sock.exists(), "socket removed once the server is gone");
}

/// The target of a live migration on host 2 of a shared pool: it answers
/// the configuration from the catalog while host 1 still holds the
/// volume, fails requests with IOERR once its bounded wait for host 1's
/// release runs out, and serves as soon as host 1 has released.
#[test]
fn incoming_target_waits_for_the_release() {
    use thinlun::{HostOptions, OpenOptions, SharedConfig};
    use thinlun_vhost::Activation;
    let dir = scratch("incoming");
    let path = dir.path().join("lun.img");
    let cfg = PoolConfig {
        size_bytes: Some(256 << 20),
        shared: Some(SharedConfig {
            io_timeout_ms: 200,
            group_bytes: Some(16 << 20),
        }),
        ..PoolConfig::default()
    };
    Pool::create_path(&path, &cfg).unwrap().close().unwrap();
    let host = |id: u32| OpenOptions {
        read_only: false,
        host: Some(HostOptions {
            host_id: id,
            host_name: Some(format!("host{id}")),
            watchdog: false,
            run_dir: Some(dir.path().join(format!("run{id}"))),
        }),
        boot_id: None,
        ..OpenOptions::default()
    };
    let host1 = Pool::open_path(&path, &host(1)).unwrap();
    host1.create_volume("vm-1", 64 << 20).unwrap();
    let source = host1.open_volume("vm-1").unwrap();
    source.write(0, &pattern(9, 4096)).unwrap();

    let host2 = Pool::open_path(&path, &host(2)).unwrap();
    let activation = Activation::handover(
        host2.clone(),
        "vm-1",
        None,
        Default::default(),
        Duration::from_millis(300),
    )
    .unwrap();
    let sock = dir.path().join("target.sock");
    let mut server =
        Server::with_activation(activation, &ServeOptions::new(&sock, "vm-1")).unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || {
        server.run().unwrap();
        server
    });

    let mut c = Client::connect(&sock, 1);
    let capacity = u64::from_le_bytes(c.config()[..8].try_into().unwrap());
    assert_eq!(capacity, (64 << 20) / 512, "size from the catalog");
    // Host 1 holds the volume: the wait runs out.
    assert_eq!(c.read(0, 0, 4096), S_IOERR);
    assert!(
        matches!(
            host2.try_open_volume("vm-1"),
            Err(thinlun::Error::Busy { .. })
        ),
        "host 1 still holds it"
    );
    // The source's last handle closes: commit, checkpoint, release.
    drop(source);
    assert_eq!(c.read(0, 0, 4096), S_OK);
    same(c.data(0, 4096), &pattern(9, 4096), "the source's write");
    c.data(4096, 4096).copy_from_slice(&pattern(10, 4096));
    assert_eq!(c.write(8, 4096, 4096), S_OK);
    // Now host 2 holds it.
    assert!(matches!(
        host1.try_open_volume("vm-1"),
        Err(thinlun::Error::Busy { .. })
    ));
    drop(c);
    stop.stop();
    let server = thread.join().unwrap();
    server.release("test over").unwrap();
    drop(server);
    let back = host1.open_volume("vm-1").unwrap();
    let mut buf = vec![0; 4096];
    back.read(8, &mut buf).unwrap();
    same(
        &buf,
        &pattern(10, 4096),
        "the target's write, back on host 1",
    );
}

/// Two servers of one volume in one process (a VM moving to a new QEMU
/// process on one host) share a writer slot: the second serves only once
/// the first has released, and then the first waits in turn.
#[test]
fn two_servers_of_one_volume_take_turns() {
    take_turns(false);
    take_turns(true);
}

/// On a pool of one host both servers keep the volume open (pinned); on a
/// shared pool they release and activate it as between hosts.
fn take_turns(shared: bool) {
    use thinlun::{HostOptions, OpenOptions, SharedConfig};
    use thinlun_vhost::{Activation, WriterSlot};
    let dir = scratch(if shared {
        "writer-slot-shared"
    } else {
        "writer-slot"
    });
    let cfg = PoolConfig {
        size_bytes: Some(256 << 20),
        shared: shared.then_some(SharedConfig {
            io_timeout_ms: 200,
            group_bytes: Some(16 << 20),
        }),
        ..PoolConfig::default()
    };
    let path = dir.path().join("lun.img");
    Pool::create_path(&path, &cfg).unwrap().close().unwrap();
    let opts = OpenOptions {
        read_only: false,
        host: shared.then(|| HostOptions {
            host_id: 1,
            host_name: Some("host1".to_string()),
            watchdog: false,
            run_dir: Some(dir.path().join("run")),
        }),
        boot_id: None,
        ..OpenOptions::default()
    };
    let pool = Pool::open_path(&path, &opts).unwrap();
    pool.create_volume("vm-1", 64 << 20).unwrap();
    let slot = Arc::new(WriterSlot::default());
    let wait = Duration::from_millis(200);
    let start = |tag: &str| {
        let vol = Arc::new(pool.open_volume("vm-1").unwrap());
        let act = if shared {
            Activation::handover(pool.clone(), "vm-1", Some(vol), slot.clone(), wait).unwrap()
        } else {
            Activation::pinned_sharing(vol, slot.clone(), wait)
        };
        let sock = dir.path().join(format!("{tag}.sock"));
        let mut server = Server::with_activation(act, &ServeOptions::new(&sock, "vm-1")).unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            server.run().unwrap();
            server
        });
        (sock, stop, thread)
    };
    let (old_sock, old_stop, old_thread) = start("old");
    let (new_sock, new_stop, new_thread) = start("new");

    let mut old = Client::connect(&old_sock, 1);
    old.data(0, 4096).copy_from_slice(&pattern(1, 4096));
    assert_eq!(old.write(0, 0, 4096), S_OK);
    let mut new = Client::connect(&new_sock, 1);
    // The old server writes: the new one's wait runs out.
    assert_eq!(new.read(0, 0, 4096), S_IOERR);
    // The old front end goes away: its server releases the slot.
    drop(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if new.read(0, 0, 4096) == S_OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never passed");
        std::thread::sleep(Duration::from_millis(50));
    }
    same(
        new.data(0, 4096),
        &pattern(1, 4096),
        "the old server's write",
    );
    // And now the old server's next front end waits for the new one.
    let mut again = Client::connect(&old_sock, 1);
    assert_eq!(again.read(0, 0, 4096), S_IOERR);
    drop((again, new));
    for (stop, thread) in [(old_stop, old_thread), (new_stop, new_thread)] {
        stop.stop();
        thread.join().unwrap().release("test over").unwrap();
    }
}

/// A server that released its volume (its front end went away) opens it
/// again by id: a rename meanwhile does not lose it.
#[test]
fn a_released_volume_renamed_meanwhile_is_opened_again() {
    use thinlun_vhost::Activation;
    let dir = scratch("renamed");
    let cfg = PoolConfig {
        size_bytes: Some(256 << 20),
        ..PoolConfig::default()
    };
    let pool = Pool::create_path(&dir.path().join("lun.img"), &cfg).unwrap();
    pool.create_volume("vm-1", 64 << 20).unwrap();
    let open = Arc::new(pool.open_volume("vm-1").unwrap());
    let act = Activation::handover(
        pool.clone(),
        "vm-1",
        Some(open),
        Default::default(),
        Duration::from_secs(1),
    )
    .unwrap();
    let sock = dir.path().join("vm.sock");
    let mut server = Server::with_activation(act, &ServeOptions::new(&sock, "vm-1")).unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || {
        server.run().unwrap();
        server
    });
    let mut c = Client::connect(&sock, 1);
    c.data(0, 4096).copy_from_slice(&pattern(3, 4096));
    assert_eq!(c.write(0, 0, 4096), S_OK);
    drop(c);
    // Released at the disconnect: the rename is allowed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = pool.rename_volume("vm-1", "vm-renamed") {
        assert!(Instant::now() < deadline, "never released: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 0, 4096), S_OK);
    same(
        c.data(0, 4096),
        &pattern(3, 4096),
        "the write, under the new name",
    );
    drop(c);
    stop.stop();
    thread.join().unwrap().release("test over").unwrap();
}
