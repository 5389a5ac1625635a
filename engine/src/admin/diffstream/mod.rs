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
//!
//! The parts: `wire` is the stream codec ([`DiffWriter`], [`DiffReader`]:
//! the header and records, byte by byte, with every check on input);
//! `export` turns a volume or snapshot pair into a stream
//! ([`export_diff`]); `import` applies one ([`import_diff`]), undoing a
//! partial import.

mod export;
mod import;
mod wire;

pub use export::export_diff;
pub use import::import_diff;
pub use wire::{DiffReader, DiffWriter, Record, MAGIC, MAX_DATA_RECORD, VERSION};

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

#[cfg(test)]
mod fixtures;

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

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
}
