//! `Volume::persist` from several threads: a persist returns only once the
//! mappings of every write completed before it are written, even when
//! another thread took them and is still writing their journal block (two
//! virtqueues of one server, each persisting its own batches). This is
//! the journal path, taken without an unflushed record; with one, the
//! entry is in the record before the write returns.

use parking_lot::{Condvar, Mutex};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thinlun::dev::{BlockDevice, IoOp, MemDevice};
use thinlun::{OpenOptions, Pool, PoolConfig, UnflushedPlace};

/// A LUN whose writes wait at a gate while it is closed.
struct GatedDevice {
    inner: MemDevice,
    closed: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicBool,
}

impl BlockDevice for GatedDevice {
    fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes()
    }
    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        if ops.iter().any(|o| matches!(o, IoOp::Write { .. })) {
            let mut closed = self.closed.lock();
            while *closed {
                self.waiting.store(true, Ordering::SeqCst);
                self.opened.wait(&mut closed);
            }
        }
        self.inner.submit(ops)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_persist_waits_for_entries_another_thread_is_writing() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(64 << 20),
        closed: Mutex::new(false),
        opened: Condvar::new(),
        waiting: AtomicBool::new(false),
    });
    let cfg = PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts: 1,
        ..PoolConfig::default()
    };
    let pool = Pool::create(dev.clone(), "gated", &cfg).unwrap();
    pool.create_volume("vm", 1 << 20).unwrap();
    pool.close().unwrap();
    let opts = OpenOptions {
        unflushed: UnflushedPlace::Off,
        ..Default::default()
    };
    let pool = Pool::open(dev.clone(), "gated", &opts).unwrap();
    let vol = pool.open_volume("vm").unwrap();
    // A first write: its mapping is pending until persisted.
    vol.write(0, &[5u8; 4096]).unwrap();
    *dev.closed.lock() = true;
    let second_returned = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The first persist takes the entry and blocks writing it.
        let first = s.spawn(|| vol.persist());
        while !dev.waiting.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The second finds nothing pending, but the entry is not written.
        let second = s.spawn(|| {
            let r = vol.persist();
            second_returned.store(true, Ordering::SeqCst);
            r
        });
        std::thread::sleep(Duration::from_millis(300));
        let early = second_returned.load(Ordering::SeqCst);
        *dev.closed.lock() = false;
        dev.opened.notify_all();
        assert!(
            !early,
            "persist returned while the entry it must cover was still being written"
        );
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
    });
}
