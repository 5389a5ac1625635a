//! A LUN seen through an in-memory overlay: reads come from the overlay
//! where it holds a block, else from the LUN below; writes and flushes are
//! only recorded. `repair` and `restore` do all their work on an overlay,
//! verify the result there, and only then [`OverlayDevice::apply`] the
//! recorded writes to the LUN, in the same order and with the same flushes,
//! so the LUN goes through exactly the states the engine's update protocols
//! allow (a crash while applying is a crash during a normal update).

use super::BLOCK_SIZE;
use super::{AlignedBuf, BlockDevice, IoOp, IO_ALIGN};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

#[derive(Default)]
struct Log {
    /// Writes between flushes: `batches[i]` is followed by a flush. The
    /// last batch may be open (no flush after it yet).
    batches: Vec<Vec<(u64, AlignedBuf)>>,
    /// Newest contents of every written block: (batch, index in batch).
    latest: HashMap<u64, (usize, usize)>,
}

/// A LUN whose writes are kept in memory until [`OverlayDevice::apply`]:
/// reads see them, the LUN below does not yet.
pub struct OverlayDevice {
    base: Arc<dyn BlockDevice>,
    log: Mutex<Log>,
}

impl OverlayDevice {
    /// An empty overlay over `base`: reads see `base` until written.
    pub fn new(base: Arc<dyn BlockDevice>) -> OverlayDevice {
        OverlayDevice {
            base,
            log: Mutex::new(Log {
                batches: vec![Vec::new()],
                latest: HashMap::new(),
            }),
        }
    }

    /// Distinct blocks written so far.
    pub fn blocks_changed(&self) -> u64 {
        self.log.lock().latest.len() as u64
    }

    /// Block writes recorded (a block written twice counts twice).
    pub fn writes_recorded(&self) -> u64 {
        self.log.lock().batches.iter().map(|b| b.len() as u64).sum()
    }

    /// Writes everything recorded to the LUN below, batch by batch with a
    /// flush after each, and a final flush. Returns the blocks written.
    pub fn apply(&self) -> io::Result<u64> {
        let log = self.log.lock();
        let mut written = 0;
        for batch in &log.batches {
            if batch.is_empty() {
                continue;
            }
            for part in batch.chunks(256) {
                let mut ops: Vec<IoOp> = part
                    .iter()
                    .map(|(b, buf)| IoOp::Write {
                        offset: b * BLOCK_SIZE as u64,
                        buf,
                    })
                    .collect();
                self.base.submit(&mut ops)?;
                written += part.len() as u64;
            }
            self.base.flush()?;
        }
        Ok(written)
    }
}

impl BlockDevice for OverlayDevice {
    fn size_bytes(&self) -> io::Result<u64> {
        self.base.size_bytes()
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        for op in ops.iter() {
            op.check()?;
        }
        let size = self.base.size_bytes()?;
        let mut log = self.log.lock();
        for op in ops.iter_mut() {
            match op {
                IoOp::Read { offset, buf } => {
                    // Read from below, then lay the overlay's blocks on top.
                    self.base.submit(&mut [IoOp::Read {
                        offset: *offset,
                        buf: &mut buf[..],
                    }])?;
                    let first = *offset / BLOCK_SIZE as u64;
                    for (k, blk) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
                        if let Some(&(bi, i)) = log.latest.get(&(first + k as u64)) {
                            blk.copy_from_slice(&log.batches[bi][i].1);
                        }
                    }
                }
                IoOp::Write { offset, buf } => {
                    if *offset + buf.len() as u64 > size {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "write past the end of the device",
                        ));
                    }
                    let first = *offset / BLOCK_SIZE as u64;
                    for (k, blk) in buf.chunks(IO_ALIGN).enumerate() {
                        let log = &mut *log;
                        let bi = log.batches.len() - 1;
                        let batch = &mut log.batches[bi];
                        batch.push((first + k as u64, AlignedBuf::from_slice(blk)));
                        log.latest.insert(first + k as u64, (bi, batch.len() - 1));
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut log = self.log.lock();
        if log.batches.last().is_some_and(|b| !b.is_empty()) {
            log.batches.push(Vec::new());
        }
        Ok(())
    }

    /// Discards are advisory and not replayed: the overlay never frees
    /// anything below it.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{read_block, write_blocks, Event, MemDevice};

    #[test]
    fn reads_see_writes_and_apply_keeps_order_and_flushes() {
        let mem = Arc::new(MemDevice::new(16 * BLOCK_SIZE as u64));
        write_blocks(mem.as_ref(), &[(3, vec![7u8; BLOCK_SIZE])]).unwrap();
        let ov = OverlayDevice::new(mem.clone());
        write_blocks(
            &ov,
            &[(1, vec![1u8; BLOCK_SIZE]), (2, vec![2u8; BLOCK_SIZE])],
        )
        .unwrap();
        ov.flush().unwrap();
        write_blocks(&ov, &[(1, vec![9u8; BLOCK_SIZE])]).unwrap();
        // Below: untouched; through the overlay: the newest contents.
        assert_eq!(read_block(mem.as_ref(), 1).unwrap()[0], 0);
        assert_eq!(read_block(&ov, 1).unwrap()[0], 9);
        assert_eq!(read_block(&ov, 2).unwrap()[0], 2);
        assert_eq!(read_block(&ov, 3).unwrap()[0], 7);
        // A multi-block read mixes both layers.
        let mut buf = AlignedBuf::zeroed(3 * BLOCK_SIZE);
        ov.submit(&mut [IoOp::Read {
            offset: BLOCK_SIZE as u64,
            buf: &mut buf,
        }])
        .unwrap();
        assert_eq!([buf[0], buf[BLOCK_SIZE], buf[2 * BLOCK_SIZE]], [9, 2, 7]);
        assert_eq!(ov.blocks_changed(), 2);
        assert_eq!(ov.writes_recorded(), 3);

        mem.start_trace();
        assert_eq!(ov.apply().unwrap(), 3);
        let t = mem.take_trace();
        let kinds: Vec<String> = t
            .events
            .iter()
            .map(|e| match e {
                Event::Write { offset, data } => format!("w{}:{}", offset / 4096, data[0]),
                Event::Flush => "f".into(),
                Event::Store { .. } => "s".into(),
            })
            .collect();
        assert_eq!(kinds, ["w1:1", "w2:2", "f", "w1:9", "f"]);
        assert_eq!(read_block(mem.as_ref(), 1).unwrap()[0], 9);
    }

    #[test]
    fn writes_past_the_end_fail() {
        let mem = Arc::new(MemDevice::new(4 * BLOCK_SIZE as u64));
        let ov = OverlayDevice::new(mem);
        assert!(write_blocks(&ov, &[(4, vec![1u8; BLOCK_SIZE])]).is_err());
    }
}
