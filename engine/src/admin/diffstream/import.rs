//! Applying a stream onto a volume ([`import_diff`]), with the checks of
//! its starting point and the undo of a partial import.

use super::wire::{DiffReader, Record};
use super::{DiffHeader, DiffStats};
use crate::error::{Error, Result};
use crate::format::names::is_valid_volume_name;
use crate::format::SECTOR_SIZE;
use crate::{Pool, VolumeInfo};
use std::io::Read;

/// Zero records are applied in pieces of at most this many bytes.
const ZERO_STEP: u64 = 1 << 30;

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
    let existing = target(pool, volume, &h)?;
    check_starting_point(pool, volume, &h, existing.as_ref())?;
    let undo = Undo::prepare(pool, volume, h.size_bytes, existing.as_ref())?;
    let result = apply(pool, volume, &h, &mut reader).and_then(|stats| {
        if !h.to.is_empty() {
            pool.create_snapshot(&format!("{volume}@{}", h.to))?;
        }
        Ok(stats)
    });
    undo.finish(pool, volume, result)
}

/// The target volume's info, None if it does not exist yet. Refused when
/// it is read-only (a base) or the stream's TO snapshot exists already.
fn target(pool: &Pool, volume: &str, h: &DiffHeader) -> Result<Option<VolumeInfo>> {
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
    Ok(existing)
}

/// Refuses a stream whose starting point the target does not hold: an
/// incremental stream needs `volume@FROM`, with the volume unchanged since;
/// a full one an empty or new volume.
fn check_starting_point(
    pool: &Pool,
    volume: &str,
    h: &DiffHeader,
    existing: Option<&VolumeInfo>,
) -> Result<()> {
    if h.from.is_empty() {
        if let Some(info) = existing {
            if info.mapped_bytes != 0 {
                return Err(Error::InvalidArgument(format!(
                    "the stream is a full copy (no starting snapshot) and volume '{volume}' is not empty ({} bytes mapped); import it into a new or empty volume",
                    info.mapped_bytes
                )));
            }
        }
        return Ok(());
    }
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
    Ok(())
}

/// How to undo a partial import.
enum Undo {
    /// The volume was created for the stream.
    Remove,
    /// The volume as it was, in this temporary snapshot, and its size.
    Rollback { snapshot: String, size: u64 },
}

impl Undo {
    /// Makes the import undoable: creates the volume (of `size` bytes) if
    /// it does not exist, else takes a temporary snapshot of it.
    fn prepare(
        pool: &Pool,
        volume: &str,
        size: u64,
        existing: Option<&VolumeInfo>,
    ) -> Result<Undo> {
        let Some(info) = existing else {
            pool.create_volume(volume, size)?;
            return Ok(Undo::Remove);
        };
        let mut snapshot = format!("{volume}@.import-diff-{}", std::process::id());
        let mut k = 1;
        while pool.volume_info(&snapshot).is_ok() {
            k += 1;
            snapshot = format!("{volume}@.import-diff-{}-{k}", std::process::id());
        }
        pool.create_snapshot(&snapshot)?;
        Ok(Undo::Rollback {
            snapshot,
            size: info.size_bytes,
        })
    }

    /// After the import: drops the temporary snapshot on success; on
    /// failure removes the new volume or rolls back to the snapshot, and
    /// returns the import's error (with the undo's, if that failed too).
    fn finish(self, pool: &Pool, volume: &str, result: Result<DiffStats>) -> Result<DiffStats> {
        match (result, self) {
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
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn wrong_starting_point_is_refused_and_nothing_changes() {
        let (_, full, incr) = source_and_streams();
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
        let (src, full, incr) = source_and_streams();
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
}
