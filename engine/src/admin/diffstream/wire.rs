//! The stream codec (docs/FORMAT.md, section 8): [`DiffWriter`] encodes a
//! header and records, [`DiffReader`] decodes and verifies them. Neither
//! knows about pools; `export` and `import` drive them.

use super::{DiffHeader, DiffStats};
use crate::error::{Error, Result};
use crate::format::catalog::MAX_NAME_LEN;
use crate::format::names::is_valid_volume_name;
use crate::format::{BLOCK_SIZE, MAX_VOLUME_BYTES, SECTOR_SIZE};
use std::io::{ErrorKind, Read, Write};

/// First 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"THINDIFF";
/// The stream version this code writes and reads.
pub const VERSION: u32 = 1;
/// The most bytes one data record may carry; longer changed ranges are
/// split into several records.
pub const MAX_DATA_RECORD: u64 = 4 << 20;

/// Bytes of the header before the two names.
const HEADER_FIXED: usize = 32;
/// Bytes of a record header (type, reserved, offset, length).
const RECORD_HEAD: usize = 24;
const TYPE_DATA: u32 = 1;
const TYPE_ZERO: u32 = 2;
const TYPE_END: u32 = 3;

/// One record of a stream, as [`DiffReader::next_record`] returns it.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// `data` goes at byte `offset`.
    Data {
        /// Byte offset in the volume.
        offset: u64,
        /// The bytes, borrowed from the reader's buffer.
        data: &'a [u8],
    },
    /// `len` bytes at `offset` read as zeros.
    Zero {
        /// Byte offset in the volume.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// The end record: it and the whole stream verified, nothing follows.
    End {
        /// Records before the end record, as the writer counted them.
        records: u64,
    },
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("not a valid diff stream: {msg}"))
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if !name.is_empty() && !is_valid_volume_name(name) {
        return Err(bad(format!("{what} snapshot name {name:?} is invalid")));
    }
    Ok(())
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) || size > MAX_VOLUME_BYTES {
        return Err(bad(format!(
            "volume size {size} is not a positive multiple of 4 KiB up to 1 EiB"
        )));
    }
    Ok(())
}

/// Checks a data or zero record's range against the volume size and the
/// end of the previous record.
fn check_range(offset: u64, len: u64, size: u64, prev_end: u64, max: Option<u64>) -> Result<u64> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || !offset.is_multiple_of(SECTOR_SIZE) {
        return Err(bad(format!(
            "record at byte {offset}, length {len}, is not whole 512-byte sectors"
        )));
    }
    if let Some(max) = max {
        if len > max {
            return Err(bad(format!(
                "data record of {len} bytes is larger than the {max}-byte limit"
            )));
        }
    }
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            bad(format!(
                "record at byte {offset}, length {len}, ends past the volume size {size}"
            ))
        })?;
    if offset < prev_end {
        return Err(bad(format!(
            "record at byte {offset} overlaps or precedes the previous one (ending at {prev_end})"
        )));
    }
    Ok(end)
}

fn record_head(kind: u32, a: u64, b: u64) -> [u8; RECORD_HEAD] {
    let mut h = [0u8; RECORD_HEAD];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&a.to_le_bytes());
    h[16..24].copy_from_slice(&b.to_le_bytes());
    h
}

/// Writes a stream: header on creation, records in ascending order,
/// [`DiffWriter::finish`] for the end record. Adjacent zero ranges are
/// merged into one record; data longer than [`MAX_DATA_RECORD`] is split.
pub struct DiffWriter<'w> {
    out: &'w mut dyn Write,
    stream_crc: crc32fast::Hasher,
    size: u64,
    prev_end: u64,
    /// A zero range not written yet, so that the next one can extend it.
    pending_zero: Option<(u64, u64)>,
    stats: DiffStats,
}

impl<'w> DiffWriter<'w> {
    /// Checks `header` and writes it to `out`; records follow with the
    /// writer's other methods.
    pub fn new(out: &'w mut dyn Write, header: &DiffHeader) -> Result<DiffWriter<'w>> {
        check_size(header.size_bytes)?;
        check_name("FROM", &header.from)?;
        check_name("TO", &header.to)?;
        let mut h = Vec::with_capacity(HEADER_FIXED + header.from.len() + header.to.len() + 4);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // flags
        h.extend_from_slice(&header.size_bytes.to_le_bytes());
        h.extend_from_slice(&(header.from.len() as u16).to_le_bytes());
        h.extend_from_slice(&(header.to.len() as u16).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // reserved
        h.extend_from_slice(header.from.as_bytes());
        h.extend_from_slice(header.to.as_bytes());
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        let mut w = DiffWriter {
            out,
            stream_crc: crc32fast::Hasher::new(),
            size: header.size_bytes,
            prev_end: 0,
            pending_zero: None,
            stats: DiffStats::default(),
        };
        w.put(&h)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream_crc.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io("writing the diff stream", e))
    }

    /// `data` (whole sectors) belongs at byte `offset`.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.flush_zero()?;
        let mut at = offset;
        for piece in data.chunks(MAX_DATA_RECORD as usize) {
            let len = piece.len() as u64;
            self.prev_end = check_range(at, len, self.size, self.prev_end, None)?;
            let head = record_head(TYPE_DATA, at, len);
            let mut crc = crc32fast::Hasher::new();
            crc.update(&head);
            crc.update(piece);
            let crc = crc.finalize();
            self.put(&head)?;
            self.put(piece)?;
            self.put(&crc.to_le_bytes())?;
            self.stats.records += 1;
            self.stats.data_bytes += len;
            at += len;
        }
        Ok(())
    }

    /// `len` bytes (whole sectors) at `offset` read as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match &mut self.pending_zero {
            Some((s, l)) if *s + *l == offset => *l += len,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((offset, len));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<()> {
        let Some((offset, len)) = self.pending_zero.take() else {
            return Ok(());
        };
        self.prev_end = check_range(offset, len, self.size, self.prev_end, None)?;
        let head = record_head(TYPE_ZERO, offset, len);
        let crc = crc32fast::hash(&head);
        self.put(&head)?;
        self.put(&crc.to_le_bytes())?;
        self.stats.records += 1;
        self.stats.zero_bytes += len;
        Ok(())
    }

    /// Writes the end record and flushes the output.
    pub fn finish(mut self) -> Result<DiffStats> {
        self.flush_zero()?;
        let head = record_head(TYPE_END, self.stats.records, 0);
        self.put(&head)?;
        let crc = self.stream_crc.clone().finalize();
        self.put(&crc.to_le_bytes())?;
        self.out
            .flush()
            .map_err(|e| Error::io("writing the diff stream", e))?;
        Ok(self.stats)
    }
}

/// A record header as read, and where the record stands in the stream.
struct Head {
    bytes: [u8; RECORD_HEAD],
    kind: u32,
    reserved: u32,
    /// The offset (data and zero records) or the record count (end).
    a: u64,
    /// The length (data and zero records); zero in the end record.
    b: u64,
    /// The record's number, from 1, and its first byte.
    n: u64,
    at: u64,
}

impl Head {
    /// "record N (at byte B)", for messages.
    fn place(&self) -> String {
        format!("record {} (at byte {})", self.n, self.at)
    }
}

/// Reads and verifies a stream. Every malformed, corrupt or truncated
/// input is an error ([`Error::InvalidArgument`]); nothing is allocated
/// beyond [`MAX_DATA_RECORD`] bytes.
pub struct DiffReader<'r> {
    input: &'r mut dyn Read,
    stream_crc: crc32fast::Hasher,
    header: DiffHeader,
    /// Bytes consumed, for messages.
    pos: u64,
    prev_end: u64,
    stats: DiffStats,
    buf: Vec<u8>,
    ended: bool,
}

impl<'r> DiffReader<'r> {
    /// Reads and verifies the header.
    pub fn new(input: &'r mut dyn Read) -> Result<DiffReader<'r>> {
        let mut r = DiffReader {
            input,
            stream_crc: crc32fast::Hasher::new(),
            header: DiffHeader {
                size_bytes: 0,
                from: String::new(),
                to: String::new(),
            },
            pos: 0,
            prev_end: 0,
            stats: DiffStats::default(),
            buf: Vec::new(),
            ended: false,
        };
        let mut fixed = [0u8; HEADER_FIXED];
        r.take(&mut fixed, "the header")?;
        if fixed[0..8] != MAGIC {
            return Err(bad("no THINDIFF magic at its start"));
        }
        let u16_at = |i: usize| u16::from_le_bytes([fixed[i], fixed[i + 1]]) as usize;
        let from_len = u16_at(24);
        let to_len = u16_at(26);
        if from_len > MAX_NAME_LEN || to_len > MAX_NAME_LEN {
            return Err(bad("header names are longer than 128 bytes"));
        }
        let mut names = [0u8; 2 * MAX_NAME_LEN + 4];
        let names = &mut names[..from_len + to_len + 4];
        r.take(names, "the header")?;
        let (body, crc) = names.split_at(from_len + to_len);
        let mut h = crc32fast::Hasher::new();
        h.update(&fixed);
        h.update(body);
        if h.finalize().to_le_bytes() != crc {
            return Err(bad("header checksum mismatch"));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(bad(format!(
                "stream version {version}; this thinlun reads version {VERSION}"
            )));
        }
        let flags = u32::from_le_bytes(fixed[12..16].try_into().unwrap_or_default());
        if flags != 0 {
            return Err(bad(format!("unknown header flags {flags:#x}")));
        }
        let size = u64::from_le_bytes(fixed[16..24].try_into().unwrap_or_default());
        check_size(size)?;
        let name = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_string)
                .map_err(|_| bad("header name is not UTF-8"))
        };
        let from = name(&body[..from_len])?;
        let to = name(&body[from_len..])?;
        check_name("FROM", &from)?;
        check_name("TO", &to)?;
        r.header = DiffHeader {
            size_bytes: size,
            from,
            to,
        };
        Ok(r)
    }

    /// The stream's header, as read and checked.
    pub fn header(&self) -> &DiffHeader {
        &self.header
    }

    /// Totals of the records read so far.
    pub fn stats(&self) -> DiffStats {
        self.stats
    }

    /// Reads exactly `buf.len()` bytes into the stream checksum.
    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        match self.input.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(bad(format!(
                    "it is truncated: it ends inside {what} (after byte {})",
                    self.pos
                )))
            }
            Err(e) => return Err(Error::io("reading the diff stream", e)),
        }
        self.stream_crc.update(buf);
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// The next record. After [`Record::End`] (which is returned only once
    /// the whole stream verified and nothing follows it), calls fail.
    pub fn next_record(&mut self) -> Result<Record<'_>> {
        if self.ended {
            return Err(Error::InvalidArgument(
                "diff stream already ended".to_string(),
            ));
        }
        let head = self.read_head()?;
        match head.kind {
            TYPE_DATA => self.data_record(&head),
            TYPE_ZERO => self.zero_record(&head),
            TYPE_END => self.end_record(&head),
            other => Err(bad(format!("{} has unknown type {other}", head.place()))),
        }
    }

    /// Reads the 24-byte header of the next record.
    fn read_head(&mut self) -> Result<Head> {
        let at = self.pos;
        let n = self.stats.records + 1;
        let mut bytes = [0u8; RECORD_HEAD];
        self.take(&mut bytes, &format!("record {n} (at byte {at})"))?;
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        Ok(Head {
            kind: u32_at(0),
            reserved: u32_at(4),
            a: u64_at(8),
            b: u64_at(16),
            bytes,
            n,
            at,
        })
    }

    /// The rest of a data record: its bytes and CRC.
    fn data_record(&mut self, head: &Head) -> Result<Record<'_>> {
        let (offset, len) = (head.a, head.b);
        // The length is checked before anything is allocated.
        let end = check_range(
            offset,
            len,
            self.header.size_bytes,
            0,
            Some(MAX_DATA_RECORD),
        )
        .map_err(|e| self.at_record(e, head))?;
        let len = len as usize;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let mut data = std::mem::take(&mut self.buf);
        let r = self.take(&mut data[..len], &head.place());
        self.buf = data;
        r?;
        let mut crc_bytes = [0u8; 4];
        self.take(&mut crc_bytes, &head.place())?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head.bytes);
        crc.update(&self.buf[..len]);
        self.verify(head, crc.finalize(), crc_bytes)?;
        self.order(offset, end, head)?;
        self.stats.records += 1;
        self.stats.data_bytes += head.b;
        Ok(Record::Data {
            offset,
            data: &self.buf[..len],
        })
    }

    /// The rest of a zero record: its CRC.
    fn zero_record(&mut self, head: &Head) -> Result<Record<'_>> {
        let (offset, len) = (head.a, head.b);
        let mut crc_bytes = [0u8; 4];
        self.take(&mut crc_bytes, &head.place())?;
        self.verify(head, crc32fast::hash(&head.bytes), crc_bytes)?;
        let end = check_range(offset, len, self.header.size_bytes, 0, None)
            .map_err(|e| self.at_record(e, head))?;
        self.order(offset, end, head)?;
        self.stats.records += 1;
        self.stats.zero_bytes += len;
        Ok(Record::Zero { offset, len })
    }

    /// The rest of the end record: the stream's CRC; then nothing may
    /// follow.
    fn end_record(&mut self, head: &Head) -> Result<Record<'_>> {
        let expect = self.stream_crc.clone().finalize();
        let mut crc = [0u8; 4];
        self.take(&mut crc, "the end record")?;
        if crc != expect.to_le_bytes() {
            return Err(bad("stream checksum mismatch in the end record"));
        }
        if head.reserved != 0 || head.b != 0 {
            return Err(bad("reserved bytes of the end record are not zero"));
        }
        if head.a != self.stats.records {
            return Err(bad(format!(
                "the end record counts {} records, the stream holds {}",
                head.a, self.stats.records
            )));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.input.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(bad("data follows the end record")),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading the diff stream", e)),
            }
        }
        self.ended = true;
        Ok(Record::End { records: head.a })
    }

    fn at_record(&self, e: Error, head: &Head) -> Error {
        match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!(
                "{m} (record {}, at byte {} of the stream)",
                head.n, head.at
            )),
            e => e,
        }
    }

    fn verify(&self, head: &Head, crc: u32, stored: [u8; 4]) -> Result<()> {
        if crc.to_le_bytes() != stored {
            return Err(bad(format!("checksum mismatch in {}", head.place())));
        }
        if head.reserved != 0 {
            return Err(bad(format!(
                "reserved bytes of {} are not zero",
                head.place()
            )));
        }
        Ok(())
    }

    fn order(&mut self, offset: u64, end: u64, head: &Head) -> Result<()> {
        if offset < self.prev_end {
            return Err(bad(format!(
                "{} overlaps or precedes the previous record",
                head.place()
            )));
        }
        self.prev_end = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn every_corrupt_byte_and_every_truncation_is_an_error() {
        let src = source();
        let incr = export(&src, Some("vm@s1"), "vm@s2");
        assert!(decode_all(&incr).is_ok());
        for i in 0..incr.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = incr.clone();
                bad[i] ^= bit;
                assert!(
                    decode_all(&bad).is_err(),
                    "flip {bit:#x} at byte {i} accepted"
                );
            }
        }
        for len in 0..incr.len() {
            let e = decode_all(&incr[..len]).unwrap_err();
            assert!(e.to_string().contains("not a valid diff stream"), "{e}");
        }
        let mut longer = incr.clone();
        longer.push(0);
        assert!(decode_all(&longer).is_err());
    }

    #[test]
    fn forged_lengths_are_refused_before_allocating() {
        // A correctly sealed header, then a data record claiming 1 TiB.
        let mut out = Vec::new();
        let h = DiffHeader {
            size_bytes: 1 << 50,
            from: String::new(),
            to: String::new(),
        };
        DiffWriter::new(&mut out, &h).unwrap();
        out.extend_from_slice(&record_head(TYPE_DATA, 0, 1 << 40));
        let e = decode_all(&out).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        // Garbage of every kind: errors, never a panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let mut junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            assert!(decode_all(&junk).is_err());
            if junk.len() >= 8 {
                junk[..8].copy_from_slice(&MAGIC);
                assert!(decode_all(&junk).is_err());
            }
        }
    }
}
