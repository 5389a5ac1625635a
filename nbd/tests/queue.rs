//! The transmission phase with many requests in flight, through a raw
//! client in this process: replies by handle in any order, FLUSH after
//! the writes before it, DISC with requests in flight, and a client that
//! stops reading its replies.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlun::{Pool, PoolConfig};
use thinlun_nbd::{Export, NbdServer};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

// Dropped in this order: the server's stop connects to its socket (to
// wake its acceptor), so the directory goes last.
struct Setup {
    sock: PathBuf,
    _server: NbdServer,
    _pool: Pool,
    _dir: tempfile::TempDir,
}

/// A pool file (so the engine's queue has its io_uring) with volume `vm`,
/// exported on a socket.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PoolConfig {
        size_bytes: Some(256 * MIB),
        ..PoolConfig::default()
    };
    let pool = Pool::create_path(&dir.path().join("pool.img"), &cfg).unwrap();
    pool.create_volume("vm", SIZE).unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::bind(&sock).unwrap();
    let export = Export {
        volume: Arc::new(pool.open_volume("vm").unwrap()),
        read_only: false,
        preferred_bytes: 1 << 20,
    };
    server.add_export("vm", export).unwrap();
    Setup {
        sock,
        _server: server,
        _pool: pool,
        _dir: dir,
    }
}

/// A client with simple replies (OPT_EXPORT_NAME, no structured replies).
struct Client {
    s: UnixStream,
    /// Read lengths by handle, to know which replies carry data.
    reads: HashMap<u64, usize>,
}

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;

impl Client {
    fn connect(sock: &Path) -> Client {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&1u32.to_be_bytes()); // OPT_EXPORT_NAME
        m.extend_from_slice(&2u32.to_be_bytes());
        m.extend_from_slice(b"vm");
        s.write_all(&m).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
        Client {
            s,
            reads: HashMap::new(),
        }
    }

    fn send(&mut self, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
        if kind == READ {
            self.reads.insert(handle, len as usize);
        }
    }

    /// The next reply: (handle, error, read data).
    fn reply(&mut self) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = Vec::new();
        if let Some(len) = self.reads.remove(&handle) {
            if err == 0 {
                data = vec![0u8; len];
                self.s.read_exact(&mut data).unwrap();
            }
        }
        (handle, err, data)
    }
}

fn pattern(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (b * 7 + i * 13) as u8).collect()
}

#[test]
fn pipelined_requests_are_all_answered_by_handle() {
    let st = setup();
    let mut c = Client::connect(&st.sock);
    // Writes of all sizes and alignments the queue and its fallbacks take.
    for i in 0..200u64 {
        c.send(WRITE, i, i * 8192, 4096, &pattern(i));
    }
    c.send(WRITE, 1000, 3 * MIB + 512, 1024, &[0x5a; 1024]); // not block-aligned
    c.send(WRITE, 1001, SIZE, 512, &[0; 512]); // past the end
    c.send(READ, 1002, SIZE - 512, 1024, &[]); // past the end
    let mut seen = HashMap::new();
    for _ in 0..203 {
        let (h, e, _) = c.reply();
        assert!(seen.insert(h, e).is_none(), "two replies to {h}");
    }
    assert!((0..200).all(|i| seen[&i] == 0) && seen[&1000] == 0);
    assert_eq!((seen[&1001], seen[&1002]), (28, 22));
    for i in 0..200u64 {
        c.send(READ, i, i * 8192, 4096, &[]);
    }
    c.send(READ, 1000, 3 * MIB, 2048, &[]);
    let mut got = HashMap::new();
    for _ in 0..201 {
        let (h, e, d) = c.reply();
        assert_eq!(e, 0);
        got.insert(h, d);
    }
    for i in 0..200u64 {
        assert_eq!(got[&i], pattern(i), "read {i}");
    }
    let odd = &got[&1000];
    assert!(odd[..512].iter().all(|&b| b == 0) && odd[512..1536].iter().all(|&b| b == 0x5a));
    c.send(DISC, 0, 0, 0, &[]);
    assert_eq!(c.s.read(&mut [0u8; 1]).unwrap(), 0);
}

#[test]
fn flush_is_answered_after_the_writes_before_it() {
    let st = setup();
    let mut c = Client::connect(&st.sock);
    for i in 0..64u64 {
        c.send(WRITE, i, i * 4096, 4096, &pattern(i));
    }
    c.send(FLUSH, 99, 0, 0, &[]);
    let order: Vec<u64> = (0..65)
        .map(|_| c.reply())
        .map(|(h, e, _)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    assert_eq!(order.last(), Some(&99));
}

#[test]
fn disconnect_answers_the_requests_in_flight_first() {
    let st = setup();
    let mut c = Client::connect(&st.sock);
    for i in 0..100u64 {
        c.send(WRITE, i, MIB + i * 4096, 4096, &pattern(i));
    }
    c.send(DISC, 0, 0, 0, &[]);
    for _ in 0..100 {
        assert_eq!(c.reply().1, 0);
    }
    assert_eq!(c.s.read(&mut [0u8; 1]).unwrap(), 0);
    let mut c = Client::connect(&st.sock);
    for i in 0..100u64 {
        c.send(READ, i, MIB + i * 4096, 4096, &[]);
        assert_eq!(c.reply().2, pattern(i));
    }
}

#[test]
fn a_client_that_stops_reading_stalls_no_one_else() {
    let st = setup();
    // 1 MiB reads, far more than the socket and the connection's bound
    // hold, and writes over the same blocks as the second client's; their
    // replies are never read. The sender blocks once the server stops
    // reading from it.
    let stuck = Client::connect(&st.sock);
    let mut w = stuck.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        for k in 0..4096u64 {
            let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
            let write = k % 2 == 1;
            m.extend_from_slice(&[0, 0, 0, u8::from(write)]);
            m.extend_from_slice(&k.to_be_bytes());
            m.extend_from_slice(&((k / 2 % 8) * MIB).to_be_bytes());
            let len = if write { 4096 } else { MIB as u32 };
            m.extend_from_slice(&len.to_be_bytes());
            if write {
                m.extend_from_slice(&pattern(k));
            }
            if w.write_all(&m).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(500));
    // Another connection writes and reads the same blocks meanwhile.
    let t0 = Instant::now();
    let mut c = Client::connect(&st.sock);
    for i in 0..64u64 {
        c.send(WRITE, i, (i % 8) * MIB, 4096, &pattern(i));
        assert_eq!(c.reply().1, 0);
        c.send(READ, i, (i % 8) * MIB, 4096, &[]);
        assert_eq!(c.reply().2, pattern(i));
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The stuck client was held back, not served without bound.
    assert!(!sender.is_finished(), "the server read all 4096 requests");
    stuck.s.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(sender.join().unwrap() < 4096);
}
