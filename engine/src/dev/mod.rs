//! The I/O layer under the engine: a LUN the engine reads and writes in
//! aligned 4 KiB multiples, in batches, with an explicit cache flush.
//!
//! [`FileDevice`] is the real one (O_DIRECT, io_uring) for files and block
//! devices; [`MemDevice`] keeps the LUN in memory and can record every write
//! and flush, so tests can rebuild the LUN as it would be after a power loss
//! at any point.

mod file;
mod mem;
mod overlay;
mod ring;
mod surviving;

pub use file::FileDevice;
pub use mem::{Event, MemDevice, Trace, TracedMemory};
pub use overlay::OverlayDevice;
pub use ring::{RawOp, Ring};
pub use surviving::{MappedFile, MemCopy, SurvivingMemory};

use std::io;

/// The internal block: the unit of mapping, allocation and validity.
pub const BLOCK_SIZE: usize = 4096;
/// log2 of [`BLOCK_SIZE`]: a byte offset shifted right by it is a block number.
pub const BLOCK_SHIFT: u32 = 12;
/// Addressing unit of the I/O API (as virtio-blk and SCSI use).
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in one block (8).
pub const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE as u64) / SECTOR_SIZE;

/// Alignment of every buffer and offset handed to a device.
pub const IO_ALIGN: usize = BLOCK_SIZE;

/// One read or write of a batch. Offsets and lengths are multiples of
/// [`IO_ALIGN`]; buffers start at an [`IO_ALIGN`]-aligned address.
pub enum IoOp<'a> {
    /// Fills `buf` from the device, starting at byte `offset`.
    Read {
        /// Byte offset on the device.
        offset: u64,
        /// Where the data goes; its length is the read's length.
        buf: &'a mut [u8],
    },
    /// Writes `buf` to the device at byte `offset`.
    Write {
        /// Byte offset on the device.
        offset: u64,
        /// The data; its length is the write's length.
        buf: &'a [u8],
    },
}

impl IoOp<'_> {
    fn check(&self) -> io::Result<()> {
        let (offset, addr, len) = match self {
            IoOp::Read { offset, buf } => (*offset, buf.as_ptr() as usize, buf.len()),
            IoOp::Write { offset, buf } => (*offset, buf.as_ptr() as usize, buf.len()),
        };
        if offset % IO_ALIGN as u64 != 0 || addr % IO_ALIGN != 0 || len % IO_ALIGN != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned device I/O (engine bug)",
            ));
        }
        Ok(())
    }
}

/// A LUN: a block device, a file, or memory.
pub trait BlockDevice: Send + Sync {
    /// Current size in bytes (grows when the file or LUN is extended).
    fn size_bytes(&self) -> io::Result<u64>;
    /// Runs every operation of the batch, concurrently where the device can,
    /// and returns when all have completed. Writes complete into the
    /// device's volatile cache: only [`BlockDevice::flush`] makes them durable.
    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tells the device a range holds no data any more (hole punch or
    /// BLKDISCARD); contents of the range become unspecified.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// An io_uring of its own over the device, with room for `entries`
    /// operations, for I/O that completes one operation at a time. `None`
    /// for devices without one: their callers run each operation through
    /// [`BlockDevice::submit`] instead.
    fn ring(&self, _entries: u32) -> Option<io::Result<Ring>> {
        None
    }
}

/// A heap buffer whose usable part is aligned for O_DIRECT, built from safe
/// code: over-allocate and start at the first aligned byte.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + IO_ALIGN];
        let start = raw.as_ptr().align_offset(IO_ALIGN);
        AlignedBuf { raw, start, len }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A run of consecutive blocks of a buffer that are all zero or all hold
/// data: `buf[offset..offset + len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRun {
    /// Byte offset of the run in the buffer.
    pub offset: usize,
    /// Length of the run in bytes (whole blocks).
    pub len: usize,
    /// Whether every byte of the run is zero.
    pub zero: bool,
}

/// Splits `buf` into runs of all-zero and non-zero 4 KiB blocks, in
/// order; a short last block counts as one. What copies data in and out
/// (`thinctl import`/`export`, `export-diff`) use to leave zero blocks
/// unwritten or to write them as holes.
pub fn block_runs(buf: &[u8]) -> Vec<BlockRun> {
    let mut runs: Vec<BlockRun> = Vec::new();
    for (i, block) in buf.chunks(BLOCK_SIZE).enumerate() {
        let zero = is_zero_block(block);
        match runs.last_mut() {
            Some(run) if run.zero == zero => run.len += block.len(),
            _ => runs.push(BlockRun {
                offset: i * BLOCK_SIZE,
                len: block.len(),
                zero,
            }),
        }
    }
    runs
}

/// Whether a block (at most 4 KiB) holds only zeros: one memcmp, fast in
/// debug builds too.
fn is_zero_block(block: &[u8]) -> bool {
    static ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    block.len() <= BLOCK_SIZE && block == &ZERO[..block.len()]
}

/// Reads one 4 KiB block.
pub fn read_block(dev: &dyn BlockDevice, block: u64) -> io::Result<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed(BLOCK_SIZE);
    dev.submit(&mut [IoOp::Read {
        offset: block * BLOCK_SIZE as u64,
        buf: &mut buf,
    }])?;
    Ok(buf)
}

/// Writes whole blocks (`(block, contents)` pairs) in one batch.
pub fn write_blocks(dev: &dyn BlockDevice, blocks: &[(u64, Vec<u8>)]) -> io::Result<()> {
    let bufs: Vec<(u64, AlignedBuf)> = blocks
        .iter()
        .map(|(b, data)| (*b, AlignedBuf::from_slice(data)))
        .collect();
    let mut ops: Vec<IoOp> = bufs
        .iter()
        .map(|(b, buf)| IoOp::Write {
            offset: b * BLOCK_SIZE as u64,
            buf,
        })
        .collect();
    dev.submit(&mut ops)
}

/// Makes blocks `start..start + count` read as zeros, writing only those
/// that do not already: a new or sparse LUN costs one read of the range.
pub fn clear_blocks(dev: &dyn BlockDevice, start: u64, count: u64) -> io::Result<()> {
    const CHUNK: u64 = 256;
    let zeros = AlignedBuf::zeroed(CHUNK as usize * BLOCK_SIZE);
    let mut buf = AlignedBuf::zeroed(CHUNK as usize * BLOCK_SIZE);
    let mut at = start;
    while at < start + count {
        let n = CHUNK.min(start + count - at);
        let len = n as usize * BLOCK_SIZE;
        dev.submit(&mut [IoOp::Read {
            offset: at * BLOCK_SIZE as u64,
            buf: &mut buf[..len],
        }])?;
        let mut ops: Vec<IoOp> = block_runs(&buf[..len])
            .into_iter()
            .filter(|r| !r.zero)
            .map(|r| IoOp::Write {
                offset: at * BLOCK_SIZE as u64 + r.offset as u64,
                buf: &zeros[..r.len],
            })
            .collect();
        if !ops.is_empty() {
            dev.submit(&mut ops)?;
        }
        at += n;
    }
    Ok(())
}

/// Blocks read in one batch into one aligned buffer.
pub(crate) struct Blocks(AlignedBuf);

impl std::ops::Index<usize> for Blocks {
    type Output = [u8];
    fn index(&self, i: usize) -> &[u8] {
        &self.0[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }
}

pub(crate) fn read_blocks(
    dev: &dyn BlockDevice,
    blocks: &[u64],
    what: &str,
) -> crate::Result<Blocks> {
    let mut buf = AlignedBuf::zeroed(blocks.len() * BLOCK_SIZE);
    let mut ops: Vec<IoOp> = buf
        .chunks_mut(BLOCK_SIZE)
        .zip(blocks)
        .map(|(b, &at)| IoOp::Read {
            offset: at * BLOCK_SIZE as u64,
            buf: b,
        })
        .collect();
    dev.submit(&mut ops)
        .map_err(|e| crate::Error::io(what, e))?;
    drop(ops);
    Ok(Blocks(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [4096, 8192, 65536] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(b.len(), len);
        }
    }

    #[test]
    fn block_runs_finds_zero_runs() {
        const B: usize = BLOCK_SIZE;
        let run = |offset, len, zero| BlockRun { offset, len, zero };
        let mut buf = vec![0u8; 5 * B + 100];
        buf[B + 7] = 1;
        buf[2 * B] = 1;
        buf[5 * B - 1] = 1;
        assert_eq!(
            block_runs(&buf),
            [
                run(0, B, true),
                run(B, 2 * B, false),
                run(3 * B, B, true),
                run(4 * B, B, false),
                run(5 * B, 100, true)
            ]
        );
        buf[5 * B + 99] = 1;
        assert_eq!(block_runs(&buf)[3..], [run(4 * B, B + 100, false)]);
        assert!(block_runs(&[]).is_empty());
    }
}
