//! Incremental backup streams, as `rbd export-diff` / `import-diff` and
//! `zfs send -i` / `receive`: the changes between two snapshots of a volume
//! (or everything a snapshot or volume holds) as a self-checking byte
//! stream, and their application onto a copy of the volume that holds the
//! starting snapshot.
//!
//! The format is described byte by byte in docs/FORMAT.md, section 8. In
//! short: a header (magic, version, volume size, FROM and TO snapshot
//! names, CRC), then data records (offset, length, bytes, CRC) and zero
//! records (offset, length, CRC) in ascending offset order, then an end
//! record (record count, CRC of the whole stream). Every field is checked
//! on input; a data record holds at most [`MAX_DATA_RECORD`] bytes, so a
//! reader never allocates more than that whatever the input says.
//!
//! ```no_run
//! use thinlun::diffstream::{export_diff, import_diff};
//! # fn demo(src: &thinlun::Pool, dst: &thinlun::Pool) -> thinlun::Result<()> {
//! // Full copy of vm-1@mon, then only what changed up to vm-1@tue.
//! let mut full = Vec::new();
//! export_diff(src, None, "vm-1@mon", &mut full)?;
//! import_diff(dst, "vm-1", &mut full.as_slice())?; // creates vm-1, vm-1@mon
//! let mut incr = Vec::new();
//! export_diff(src, Some("mon"), "vm-1@tue", &mut incr)?;
//! import_diff(dst, "vm-1", &mut incr.as_slice())?; // needs vm-1@mon, unchanged
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::format::catalog::MAX_NAME_LEN;
use crate::format::names::is_valid_volume_name;
use crate::format::{BLOCK_SIZE, MAX_VOLUME_BYTES, SECTOR_SIZE};
use crate::Pool;
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
/// Zero records are applied in pieces of at most this many bytes.
const ZERO_STEP: u64 = 1 << 30;

/// What a stream's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffHeader {
    /// Size of the volume at TO; the target takes this size.
    pub size_bytes: u64,
    /// Snapshot name (the part after '@') the changes start from; empty
    /// for a full stream.
    pub from: String,
    /// Snapshot name the changes lead to; empty when TO was the live
    /// volume (no snapshot is created on import).
    pub to: String,
}

/// What a stream carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Data and zero records (header and end record not counted).
    pub records: u64,
    /// Bytes carried by data records.
    pub data_bytes: u64,
    /// Bytes covered by zero records.
    pub zero_bytes: u64,
}

/// One record of a stream, as [`DiffReader::next_record`] returns it.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// `data` goes at byte `offset`.
    Data { offset: u64, data: &'a [u8] },
    /// `len` bytes at `offset` read as zeros.
    Zero { offset: u64, len: u64 },
    /// The end record: it and the whole stream verified, nothing follows.
    End { records: u64 },
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
        let at = self.pos;
        let n = self.stats.records + 1;
        let mut head = [0u8; RECORD_HEAD];
        self.take(&mut head, &format!("record {n} (at byte {at})"))?;
        let kind = u32::from_le_bytes(head[0..4].try_into().unwrap_or_default());
        let reserved = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default());
        let a = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        let b = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
        let mut crc_bytes = [0u8; 4];
        match kind {
            TYPE_DATA => {
                // The length is checked before anything is allocated.
                let end = check_range(a, b, self.header.size_bytes, 0, Some(MAX_DATA_RECORD))
                    .map_err(|e| self.at_record(e, n, at))?;
                let len = b as usize;
                if self.buf.len() < len {
                    self.buf.resize(len, 0);
                }
                let mut data = std::mem::take(&mut self.buf);
                let r = self.take(&mut data[..len], &format!("record {n} (at byte {at})"));
                self.buf = data;
                r?;
                self.take(&mut crc_bytes, &format!("record {n} (at byte {at})"))?;
                let mut crc = crc32fast::Hasher::new();
                crc.update(&head);
                crc.update(&self.buf[..len]);
                self.verify(reserved, crc.finalize(), crc_bytes, n, at)?;
                self.order(a, end, n, at)?;
                self.stats.records += 1;
                self.stats.data_bytes += b;
                Ok(Record::Data {
                    offset: a,
                    data: &self.buf[..len],
                })
            }
            TYPE_ZERO => {
                self.take(&mut crc_bytes, &format!("record {n} (at byte {at})"))?;
                self.verify(reserved, crc32fast::hash(&head), crc_bytes, n, at)?;
                let end = check_range(a, b, self.header.size_bytes, 0, None)
                    .map_err(|e| self.at_record(e, n, at))?;
                self.order(a, end, n, at)?;
                self.stats.records += 1;
                self.stats.zero_bytes += b;
                Ok(Record::Zero { offset: a, len: b })
            }
            TYPE_END => {
                let expect = self.stream_crc.clone().finalize();
                let mut crc = [0u8; 4];
                self.take(&mut crc, "the end record")?;
                if crc != expect.to_le_bytes() {
                    return Err(bad("stream checksum mismatch in the end record"));
                }
                if reserved != 0 || b != 0 {
                    return Err(bad("reserved bytes of the end record are not zero"));
                }
                if a != self.stats.records {
                    return Err(bad(format!(
                        "the end record counts {a} records, the stream holds {}",
                        self.stats.records
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
                Ok(Record::End { records: a })
            }
            other => Err(bad(format!(
                "record {n} (at byte {at}) has unknown type {other}"
            ))),
        }
    }

    fn at_record(&self, e: Error, n: u64, at: u64) -> Error {
        match e {
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("{m} (record {n}, at byte {at} of the stream)"))
            }
            e => e,
        }
    }

    fn verify(&self, reserved: u32, crc: u32, stored: [u8; 4], n: u64, at: u64) -> Result<()> {
        if crc.to_le_bytes() != stored {
            return Err(bad(format!(
                "checksum mismatch in record {n} (at byte {at})"
            )));
        }
        if reserved != 0 {
            return Err(bad(format!(
                "reserved bytes of record {n} (at byte {at}) are not zero"
            )));
        }
        Ok(())
    }

    fn order(&mut self, offset: u64, end: u64, n: u64, at: u64) -> Result<()> {
        if offset < self.prev_end {
            return Err(bad(format!(
                "record {n} (at byte {at}) overlaps or precedes the previous record"
            )));
        }
        self.prev_end = end;
        Ok(())
    }
}

/// Splits a volume name into (volume, snapshot part or "").
fn split_spec(spec: &str) -> (&str, &str) {
    spec.split_once('@').unwrap_or((spec, ""))
}

/// Whether a block (at most 4 KiB) holds only zeros: one memcmp, fast
/// in debug builds too.
fn is_zero(block: &[u8]) -> bool {
    static ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    block.len() <= BLOCK_SIZE && block == &ZERO[..block.len()]
}

/// Runs of all-zero and non-zero 4 KiB blocks in `buf`: (offset, len, zero).
fn block_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(BLOCK_SIZE).enumerate() {
        let zero = is_zero(block);
        match runs.last_mut() {
            Some(run) if run.2 == zero => run.1 += block.len(),
            _ => runs.push((i * BLOCK_SIZE, block.len(), zero)),
        }
    }
    runs
}

/// Writes the changes from snapshot `from` to `to` as a stream.
///
/// `to` is a snapshot (`vol@snap`) or a volume; `from` is a snapshot of
/// the same volume, given as `snap` or `vol@snap`, older than `to`. With
/// `from` = None, the stream holds all of `to` (a full stream; all-zero
/// blocks are left out) and applies onto an empty or new volume.
pub fn export_diff(
    pool: &Pool,
    from: Option<&str>,
    to: &str,
    out: &mut dyn Write,
) -> Result<DiffStats> {
    let info = pool.volume_info(to)?;
    let (vol_name, to_snap) = split_spec(to);
    let from_full = match from.filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => Some(match f.split_once('@') {
            Some((v, _)) if v != vol_name => {
                return Err(Error::InvalidArgument(format!(
                    "'{f}' is not a snapshot of '{vol_name}'"
                )))
            }
            Some(_) => f.to_string(),
            None => format!("{vol_name}@{f}"),
        }),
    };
    let size = info.size_bytes;
    let ranges: Vec<(u64, u64)> = match &from_full {
        Some(f) => {
            let snap = pool.volume_info(f)?;
            if !snap.snapshot {
                return Err(Error::InvalidArgument(format!(
                    "'{f}' is not a snapshot (use VOL@SNAP)"
                )));
            }
            // A volume shrunk since FROM differs past its new end too;
            // the stream's size already cuts that off.
            pool.diff(f, to)?
                .into_iter()
                .filter(|&(o, _)| o < size)
                .map(|(o, l)| (o, l.min(size - o)))
                .collect()
        }
        // A full stream carries only what holds data.
        None => pool.mapped_ranges(to)?,
    };
    let header = DiffHeader {
        size_bytes: size,
        from: from_full
            .as_deref()
            .map_or("", |f| split_spec(f).1)
            .to_string(),
        to: to_snap.to_string(),
    };
    let vol = pool.open_volume(to)?;
    let mut w = DiffWriter::new(out, &header)?;
    let mut buf = vec![0u8; MAX_DATA_RECORD as usize];
    for (start, len) in ranges {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(MAX_DATA_RECORD) as usize;
            let chunk = &mut buf[..n];
            vol.read(at / SECTOR_SIZE, chunk)?;
            for (o, l, zero) in block_runs(chunk) {
                let off = at + o as u64;
                if !zero {
                    w.data(off, &chunk[o..o + l])?;
                } else if from_full.is_some() {
                    // Onto the starting point these blocks must read as
                    // zeros; a full stream goes onto an empty volume.
                    w.zero(off, l as u64)?;
                }
            }
            at += n as u64;
        }
    }
    w.finish()
}

/// How to undo a partial import.
enum Undo {
    /// The volume was created for the stream.
    Remove,
    /// The volume as it was, in this temporary snapshot, and its size.
    Rollback { snapshot: String, size: u64 },
}

/// Applies a stream onto `volume`.
///
/// Refused, with nothing changed, unless the starting point matches: for
/// a stream from snapshot FROM, `volume` must hold `volume@FROM` and be
/// unchanged since; a full stream needs `volume` to be empty or not to
/// exist (it is then created). The volume takes the stream's size. When
/// the stream names a TO snapshot, `volume@TO` is created once the whole
/// stream has verified.
///
/// A stream found corrupt or truncated part-way leaves the volume as it
/// was: the import first takes a temporary snapshot `volume@.import-diff-PID`
/// and rolls back to it on failure (a volume created for the stream is
/// removed). A crash during the import leaves that snapshot behind;
/// `rollback` to it restores the old content.
pub fn import_diff(pool: &Pool, volume: &str, input: &mut dyn Read) -> Result<DiffStats> {
    if volume.contains('@') {
        return Err(Error::ReadOnly(volume.to_string()));
    }
    if !is_valid_volume_name(volume) {
        return Err(Error::InvalidName(volume.to_string()));
    }
    let mut reader = DiffReader::new(input)?;
    let h = reader.header().clone();
    let existing = match pool.volume_info(volume) {
        Ok(info) => Some(info),
        Err(Error::NoSuchVolume(_)) => None,
        Err(e) => return Err(e),
    };
    if let Some(info) = &existing {
        if info.read_only {
            return Err(Error::ReadOnly(volume.to_string()));
        }
    }
    if !h.to.is_empty() {
        // Most likely the stream was applied already.
        let to_full = format!("{volume}@{}", h.to);
        if pool.volume_info(&to_full).is_ok() {
            return Err(Error::VolumeExists(to_full));
        }
    }
    if !h.from.is_empty() {
        let from_full = format!("{volume}@{}", h.from);
        if existing.is_none() {
            return Err(Error::InvalidArgument(format!(
                "the stream holds the changes since snapshot '{}', but volume '{volume}' does not exist (import the full stream first)",
                h.from
            )));
        }
        match pool.volume_info(&from_full) {
            Ok(_) => {}
            Err(Error::NoSuchVolume(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "the stream holds the changes since snapshot '{}', but '{from_full}' does not exist",
                    h.from
                )))
            }
            Err(e) => return Err(e),
        }
        let changed: u64 = pool.diff(&from_full, volume)?.iter().map(|r| r.1).sum();
        if changed != 0 {
            return Err(Error::InvalidArgument(format!(
                "volume '{volume}' has changed since '{from_full}' ({changed} bytes differ); roll it back to '{from_full}' first"
            )));
        }
    } else if let Some(info) = &existing {
        if info.mapped_bytes != 0 {
            return Err(Error::InvalidArgument(format!(
                "the stream is a full copy (no starting snapshot) and volume '{volume}' is not empty ({} bytes mapped); import it into a new or empty volume",
                info.mapped_bytes
            )));
        }
    }
    let undo = match &existing {
        None => {
            pool.create_volume(volume, h.size_bytes)?;
            Undo::Remove
        }
        Some(info) => {
            let mut snapshot = format!("{volume}@.import-diff-{}", std::process::id());
            let mut k = 1;
            while pool.volume_info(&snapshot).is_ok() {
                k += 1;
                snapshot = format!("{volume}@.import-diff-{}-{k}", std::process::id());
            }
            pool.create_snapshot(&snapshot)?;
            Undo::Rollback {
                snapshot,
                size: info.size_bytes,
            }
        }
    };
    let result = apply(pool, volume, &h, &mut reader).and_then(|stats| {
        if !h.to.is_empty() {
            pool.create_snapshot(&format!("{volume}@{}", h.to))?;
        }
        Ok(stats)
    });
    match (result, undo) {
        (Ok(stats), Undo::Remove) => Ok(stats),
        (Ok(stats), Undo::Rollback { snapshot, .. }) => {
            pool.remove_volume(&snapshot, false)?;
            Ok(stats)
        }
        (Err(e), Undo::Remove) => match pool.remove_volume(volume, true) {
            Ok(()) => Err(e),
            Err(e2) => Err(Error::busy(
                crate::BusyKind::UndoFailed,
                format!("{e}; removing the partly imported volume '{volume}' failed too: {e2}"),
            )),
        },
        (Err(e), Undo::Rollback { snapshot, size }) => {
            let restored = pool.rollback(&snapshot, false).and_then(|()| {
                if pool.volume_info(volume)?.size_bytes != size {
                    pool.resize_volume(volume, size, true)?;
                }
                pool.remove_volume(&snapshot, false)
            });
            match restored {
                Ok(()) => Err(e),
                Err(e2) => Err(Error::busy(crate::BusyKind::UndoFailed, format!(
                    "{e}; undoing the partial import failed too ({e2}): the old content of '{volume}' is in snapshot '{snapshot}'"
                ))),
            }
        }
    }
}

/// Resizes the volume and writes every record; the volume is closed on
/// return.
fn apply(pool: &Pool, volume: &str, h: &DiffHeader, reader: &mut DiffReader) -> Result<DiffStats> {
    if pool.volume_info(volume)?.size_bytes != h.size_bytes {
        // Data past a smaller new end is kept by the starting snapshot.
        pool.resize_volume(volume, h.size_bytes, true)?;
    }
    let vol = pool.open_volume(volume)?;
    loop {
        match reader.next_record()? {
            Record::Data { offset, data } => vol.write(offset / SECTOR_SIZE, data)?,
            Record::Zero { offset, len } => {
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(ZERO_STEP);
                    vol.write_zeroes(at / SECTOR_SIZE, n / SECTOR_SIZE)?;
                    at += n;
                }
            }
            Record::End { .. } => break,
        }
    }
    vol.flush()?;
    Ok(reader.stats())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use crate::PoolConfig;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;
    const BS: usize = BLOCK_SIZE;

    fn new_pool() -> Pool {
        let cfg = PoolConfig {
            chunk_bytes: 64 << 10,
            max_hosts: 1,
            ..PoolConfig::default()
        };
        Pool::create(Arc::new(MemDevice::new(64 * MIB)), "mem", &cfg).unwrap()
    }

    fn write(pool: &Pool, vol: &str, block: u64, tag: u8, blocks: usize) {
        let v = pool.open_volume(vol).unwrap();
        v.write(block * 8, &vec![tag; blocks * BS]).unwrap();
    }

    fn content(pool: &Pool, vol: &str) -> Vec<u8> {
        let v = pool.open_volume(vol).unwrap();
        let mut buf = vec![0u8; v.size_bytes() as usize];
        v.read(0, &mut buf).unwrap();
        buf
    }

    fn names(pool: &Pool) -> Vec<String> {
        pool.volumes().into_iter().map(|v| v.name).collect()
    }

    fn export(pool: &Pool, from: Option<&str>, to: &str) -> Vec<u8> {
        let mut out = Vec::new();
        export_diff(pool, from, to, &mut out).unwrap();
        out
    }

    /// Source pool with vm@s1 and vm@s2 (changes, a discard, a grow).
    fn source() -> Pool {
        let p = new_pool();
        p.create_volume("vm", 2 * MIB).unwrap();
        write(&p, "vm", 0, 1, 4);
        write(&p, "vm", 100, 2, 20);
        write(&p, "vm", 300, 3, 1);
        p.create_snapshot("vm@s1").unwrap();
        write(&p, "vm", 2, 4, 1);
        let v = p.open_volume("vm").unwrap();
        v.write_zeroes(105 * 8, 10 * 8).unwrap();
        v.write(301 * 8 + 3, &[9u8; 512]).unwrap();
        drop(v);
        p.resize_volume("vm", 3 * MIB, false).unwrap();
        write(&p, "vm", 700, 5, 2);
        p.create_snapshot("vm@s2").unwrap();
        p
    }

    /// A record as (b'd' or b'z', offset, length).
    type Rec = (u8, u64, u64);

    fn decode_all(bytes: &[u8]) -> Result<(DiffHeader, Vec<Rec>)> {
        let mut input = bytes;
        let mut r = DiffReader::new(&mut input)?;
        let h = r.header().clone();
        let mut recs = Vec::new();
        loop {
            match r.next_record()? {
                Record::Data { offset, data } => recs.push((b'd', offset, data.len() as u64)),
                Record::Zero { offset, len } => recs.push((b'z', offset, len)),
                Record::End { records } => {
                    assert_eq!(records as usize, recs.len());
                    return Ok((h, recs));
                }
            }
        }
    }

    #[test]
    fn roundtrip_full_then_incremental() {
        let src = source();
        let full = export(&src, None, "vm@s1");
        let (h, recs) = decode_all(&full).unwrap();
        assert_eq!(h.size_bytes, 2 * MIB);
        assert_eq!((h.from.as_str(), h.to.as_str()), ("", "s1"));
        // Data only, all-zero blocks left out: blocks 0..4, 100..120, 300.
        let expect = [
            (b'd', 0, 4 * BS as u64),
            (b'd', 100 * BS as u64, 20 * BS as u64),
            (b'd', 300 * BS as u64, BS as u64),
        ];
        assert_eq!(recs, expect);

        let dst = new_pool();
        let stats = import_diff(&dst, "vm", &mut full.as_slice()).unwrap();
        assert_eq!(stats.records, 3);
        assert_eq!(stats.data_bytes, 25 * BS as u64);
        assert_eq!(names(&dst), ["vm", "vm@s1"]);
        assert_eq!(content(&dst, "vm@s1"), content(&src, "vm@s1"));

        let incr = export(&src, Some("s1"), "vm@s2");
        let (h, recs) = decode_all(&incr).unwrap();
        assert_eq!((h.from.as_str(), h.to.as_str()), ("s1", "s2"));
        assert_eq!(h.size_bytes, 3 * MIB);
        assert!(recs.iter().any(|r| r.0 == b'z'), "{recs:?}");
        let stats = import_diff(&dst, "vm", &mut incr.as_slice()).unwrap();
        assert_eq!(stats.records as usize, recs.len());
        assert_eq!(names(&dst), ["vm", "vm@s1", "vm@s2"]);
        assert_eq!(content(&dst, "vm@s2"), content(&src, "vm@s2"));
        assert_eq!(content(&dst, "vm"), content(&src, "vm@s2"));
        assert_eq!(content(&dst, "vm@s1"), content(&src, "vm@s1"));
        // The same changes again, exported from the copy: byte for byte.
        assert_eq!(export(&dst, Some("vm@s1"), "vm@s2"), incr);
        assert_eq!(export(&dst, None, "vm@s1"), full);
        assert!(dst.verify_space().is_empty(), "{:?}", dst.verify_space());

        // To the live volume: no TO snapshot is made.
        write(&src, "vm", 10, 7, 1);
        let live = export(&src, Some("s2"), "vm");
        assert_eq!(decode_all(&live).unwrap().0.to, "");
        import_diff(&dst, "vm", &mut live.as_slice()).unwrap();
        assert_eq!(names(&dst), ["vm", "vm@s1", "vm@s2"]);
        assert_eq!(content(&dst, "vm"), content(&src, "vm"));
    }

    #[test]
    fn large_ranges_are_split_and_zero_runs_merged() {
        let p = new_pool();
        p.create_volume("big", 16 * MIB).unwrap();
        write(&p, "big", 0, 1, 9 * 256); // 9 MiB of data
        p.create_snapshot("big@a").unwrap();
        let v = p.open_volume("big").unwrap();
        v.write_zeroes(0, 9 * MIB / 512).unwrap();
        drop(v);
        let (_, recs) = decode_all(&export(&p, None, "big@a")).unwrap();
        assert_eq!(
            recs,
            [
                (b'd', 0, 4 * MIB),
                (b'd', 4 * MIB, 4 * MIB),
                (b'd', 8 * MIB, MIB)
            ]
        );
        let (_, recs) = decode_all(&export(&p, Some("a"), "big")).unwrap();
        assert_eq!(recs, [(b'z', 0, 9 * MIB)]);
    }

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

    #[test]
    fn wrong_starting_point_is_refused_and_nothing_changes() {
        let src = source();
        let full = export(&src, None, "vm@s1");
        let incr = export(&src, Some("s1"), "vm@s2");

        let dst = new_pool();
        // No volume at all.
        let e = import_diff(&dst, "vm", &mut incr.as_slice()).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(names(&dst).is_empty());
        // A volume without the snapshot.
        dst.create_volume("vm", 2 * MIB).unwrap();
        write(&dst, "vm", 0, 8, 1);
        let e = import_diff(&dst, "vm", &mut incr.as_slice()).unwrap_err();
        assert!(e.to_string().contains("'vm@s1' does not exist"), "{e}");
        // A full stream onto a volume with data.
        let e = import_diff(&dst, "vm", &mut full.as_slice()).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        dst.remove_volume("vm", false).unwrap();

        import_diff(&dst, "vm", &mut full.as_slice()).unwrap();
        // Changed since s1.
        write(&dst, "vm", 50, 6, 1);
        let before = content(&dst, "vm");
        let used = dst.status().data_used_bytes;
        let e = import_diff(&dst, "vm", &mut incr.as_slice()).unwrap_err();
        assert!(e.to_string().contains("has changed since 'vm@s1'"), "{e}");
        assert_eq!(content(&dst, "vm"), before);
        assert_eq!(names(&dst), ["vm", "vm@s1"]);
        assert_eq!(dst.status().data_used_bytes, used);
        // Back at s1 it applies; a second time the TO snapshot exists.
        dst.rollback("vm@s1", false).unwrap();
        import_diff(&dst, "vm", &mut incr.as_slice()).unwrap();
        dst.rollback("vm@s1", true).unwrap();
        assert_eq!(names(&dst), ["vm", "vm@s1"]);
        dst.create_snapshot("vm@s2").unwrap();
        let e = import_diff(&dst, "vm", &mut incr.as_slice()).unwrap_err();
        assert!(matches!(e, Error::VolumeExists(_)), "{e}");
        // Snapshots and bases are not targets.
        assert!(matches!(
            import_diff(&dst, "vm@s1", &mut incr.as_slice()),
            Err(Error::ReadOnly(_))
        ));
        dst.create_volume("tpl", MIB).unwrap();
        dst.make_base("tpl", None).unwrap();
        assert!(matches!(
            import_diff(&dst, "tpl", &mut full.as_slice()),
            Err(Error::ReadOnly(_))
        ));
    }

    #[test]
    fn a_stream_corrupt_part_way_leaves_the_volume_as_it_was() {
        let src = source();
        let full = export(&src, None, "vm@s1");
        let incr = export(&src, Some("s1"), "vm@s2");
        let dst = new_pool();
        // Full stream into a new volume: the volume is removed again.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 10] ^= 1;
        assert!(import_diff(&dst, "vm", &mut bad.as_slice()).is_err());
        assert!(names(&dst).is_empty());
        assert!(import_diff(&dst, "vm", &mut &full[..n - 1]).is_err());
        assert!(names(&dst).is_empty());

        import_diff(&dst, "vm", &mut full.as_slice()).unwrap();
        let before = content(&dst, "vm");
        let used = dst.status().data_used_bytes;
        // Incremental: damage near the end, after most records applied,
        // and a truncation.
        let mut bad = incr.clone();
        let n = bad.len();
        bad[n - 30] ^= 0x40;
        for input in [&bad[..], &incr[..n - 5]] {
            let e = import_diff(&dst, "vm", &mut &input[..]).unwrap_err();
            assert!(e.to_string().contains("not a valid diff stream"), "{e}");
            assert_eq!(names(&dst), ["vm", "vm@s1"]);
            assert_eq!(dst.volume_info("vm").unwrap().size_bytes, 2 * MIB);
            assert_eq!(content(&dst, "vm"), before);
            assert!(dst.diff("vm@s1", "vm").unwrap().is_empty());
            assert!(dst.verify_space().is_empty());
        }
        // Space the failed attempts wrote is free again once reusable.
        dst.flush().unwrap();
        dst.flush().unwrap();
        assert!(dst.status().data_used_bytes <= used + 4 * BS as u64);
        import_diff(&dst, "vm", &mut incr.as_slice()).unwrap();
        assert_eq!(content(&dst, "vm"), content(&src, "vm@s2"));
    }

    #[test]
    fn export_checks_its_arguments() {
        let src = source();
        let mut out = Vec::new();
        for (from, to) in [
            (Some("nope"), "vm"),
            (Some("other@s1"), "vm@s2"),
            (Some("s2"), "vm@s1"),
            (None, "missing"),
        ] {
            assert!(
                export_diff(&src, from, to, &mut out).is_err(),
                "{from:?} {to}"
            );
        }
    }
}
