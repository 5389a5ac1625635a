//! An in-memory LUN that can record what the engine writes, for crash-point
//! tests: a [`Trace`] rebuilds the LUN as a power loss would leave it after
//! any prefix of the recorded writes and flushes, with any subset of the
//! writes not yet covered by a flush lost (a volatile cache may drop or
//! reorder them, one 4 KiB block at a time). Stores into the device's
//! [`TracedMemory`] (the engine's surviving memory in such tests) go into
//! the same recording, so a crash point fixes both.

use super::{BlockDevice, IoOp, SurvivingMemory, IO_ALIGN};
use parking_lot::{Mutex, RwLock};
use std::io;
use std::sync::Arc;

/// One recorded step of a [`Trace`].
#[derive(Clone, Debug)]
pub enum Event {
    /// A write that completed into the device's volatile cache.
    Write {
        /// Byte offset on the LUN.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A cache flush: every earlier write is durable.
    Flush,
    /// A store into surviving memory: kept by a process crash, gone after
    /// a power loss.
    Store {
        /// Byte offset into the memory.
        offset: usize,
        /// The bytes stored.
        data: Vec<u8>,
    },
}

/// A recording: the LUN when recording started, then every write and flush.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The LUN's contents when recording started.
    pub base: Vec<u8>,
    /// What happened since, in order.
    pub events: Vec<Event>,
}

impl Trace {
    /// Index just past the last flush among `events[..upto]` (0 if none).
    pub fn durable_prefix(&self, upto: usize) -> usize {
        self.events[..upto]
            .iter()
            .rposition(|e| matches!(e, Event::Flush))
            .map_or(0, |i| i + 1)
    }

    /// The LUN after power loss once `events[..upto]` were issued: every
    /// write before the last flush is there; of the later ones each 4 KiB
    /// block is kept only if `keep(event_index, block_index)` says so.
    pub fn crash_image(&self, upto: usize, keep: &mut dyn FnMut(usize, usize) -> bool) -> Vec<u8> {
        let durable = self.durable_prefix(upto);
        let mut img = self.base.clone();
        for (i, ev) in self.events[..upto].iter().enumerate() {
            if let Event::Write { offset, data } = ev {
                for (k, blk) in data.chunks(IO_ALIGN).enumerate() {
                    if i < durable || keep(i, k) {
                        let at = *offset as usize + k * IO_ALIGN;
                        if at + blk.len() <= img.len() {
                            img[at..at + blk.len()].copy_from_slice(blk);
                        }
                    }
                }
            }
        }
        img
    }

    /// Surviving memory once `events[..upto]` were issued, from its
    /// contents `base` when recording started (a process crash keeps every
    /// store made before it).
    pub fn memory_image(&self, upto: usize, base: &[u8]) -> Vec<u8> {
        let mut mem = base.to_vec();
        for ev in &self.events[..upto] {
            if let Event::Store { offset, data } = ev {
                mem[*offset..*offset + data.len()].copy_from_slice(data);
            }
        }
        mem
    }
}

type SharedTrace = Arc<Mutex<Option<Trace>>>;

/// A LUN held in memory, for tests and seeds; it can record a [`Trace`] of
/// its writes and flushes.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    trace: SharedTrace,
}

impl MemDevice {
    /// A zero-filled LUN of `size` bytes.
    pub fn new(size: u64) -> MemDevice {
        MemDevice::from_image(vec![0u8; size as usize])
    }

    /// A LUN holding `image` (a saved image or a crash image).
    pub fn from_image(image: Vec<u8>) -> MemDevice {
        MemDevice {
            data: RwLock::new(image),
            trace: Arc::new(Mutex::new(None)),
        }
    }

    /// Surviving memory of `len` bytes whose stores are recorded with this
    /// device's writes.
    pub fn surviving_memory(&self, len: usize) -> Arc<TracedMemory> {
        Arc::new(TracedMemory {
            data: Mutex::new(vec![0u8; len]),
            trace: self.trace.clone(),
        })
    }

    /// The current contents (as reads see them).
    pub fn image(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    /// Starts recording from the current contents.
    pub fn start_trace(&self) {
        *self.trace.lock() = Some(Trace {
            base: self.image(),
            events: Vec::new(),
        });
    }

    /// Stops recording and returns what was recorded (empty if nothing was).
    pub fn take_trace(&self) -> Trace {
        self.trace.lock().take().unwrap_or_default()
    }

    /// Number of events recorded so far (a crash point).
    pub fn trace_len(&self) -> usize {
        self.trace.lock().as_ref().map_or(0, |t| t.events.len())
    }

    /// Bytes written since recording started (to measure write cost).
    pub fn bytes_written(&self) -> u64 {
        self.trace.lock().as_ref().map_or(0, |t| {
            t.events
                .iter()
                .map(|e| match e {
                    Event::Write { data, .. } => data.len() as u64,
                    Event::Flush | Event::Store { .. } => 0,
                })
                .sum()
        })
    }

    /// Grows the LUN, as extending a file or a SAN LUN does.
    pub fn grow(&self, new_size: u64) {
        let mut d = self.data.write();
        if new_size as usize > d.len() {
            d.resize(new_size as usize, 0);
        }
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.data.read().len() as u64)
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        for op in ops.iter() {
            op.check()?;
        }
        for op in ops.iter_mut() {
            match op {
                IoOp::Read { offset, buf } => {
                    let d = self.data.read();
                    let at = *offset as usize;
                    let end = (at + buf.len()).min(d.len());
                    let n = end.saturating_sub(at);
                    if n > 0 {
                        buf[..n].copy_from_slice(&d[at..end]);
                    }
                    buf[n..].fill(0);
                }
                IoOp::Write { offset, buf } => {
                    let at = *offset as usize;
                    {
                        let mut d = self.data.write();
                        if at + buf.len() > d.len() {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "write past the end of the device",
                            ));
                        }
                        d[at..at + buf.len()].copy_from_slice(buf);
                    }
                    if let Some(t) = self.trace.lock().as_mut() {
                        t.events.push(Event::Write {
                            offset: *offset,
                            data: buf.to_vec(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(t) = self.trace.lock().as_mut() {
            t.events.push(Event::Flush);
        }
        Ok(())
    }
}

/// See [`MemDevice::surviving_memory`].
pub struct TracedMemory {
    data: Mutex<Vec<u8>>,
    trace: SharedTrace,
}

impl TracedMemory {
    /// A copy of the memory as it is now.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().clone()
    }
}

impl SurvivingMemory for TracedMemory {
    fn len(&self) -> usize {
        self.data.lock().len()
    }

    fn store(&self, offset: usize, bytes: &[u8]) {
        self.data.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
        if let Some(t) = self.trace.lock().as_mut() {
            t.events.push(Event::Store {
                offset,
                data: bytes.to_vec(),
            });
        }
    }

    fn load(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.data.lock()[offset..offset + out.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::AlignedBuf;

    #[test]
    fn crash_image_keeps_flushed_and_chosen_writes() {
        let dev = MemDevice::new(4 * 4096);
        dev.start_trace();
        let a = AlignedBuf::from_slice(&[1u8; 4096]);
        let b = AlignedBuf::from_slice(&[2u8; 8192]);
        dev.submit(&mut [IoOp::Write { offset: 0, buf: &a }])
            .unwrap();
        dev.flush().unwrap();
        dev.submit(&mut [IoOp::Write {
            offset: 4096,
            buf: &b,
        }])
        .unwrap();
        let t = dev.take_trace();
        let none = t.crash_image(3, &mut |_, _| false);
        assert_eq!(none[0], 1);
        assert_eq!(none[4096], 0);
        let half = t.crash_image(3, &mut |_, k| k == 1);
        assert_eq!(half[4096], 0);
        assert_eq!(half[8192], 2);
        let before_flush = t.crash_image(1, &mut |_, _| false);
        assert_eq!(before_flush[0], 0);
    }
}
