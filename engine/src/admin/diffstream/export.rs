//! Writing a stream from a volume or a snapshot pair ([`export_diff`]).

use super::wire::{DiffWriter, MAX_DATA_RECORD};
use super::{DiffHeader, DiffStats};
use crate::dev::block_runs;
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::{Pool, Volume};
use std::io::Write;

/// Splits a volume name into (volume, snapshot part or "").
fn split_spec(spec: &str) -> (&str, &str) {
    spec.split_once('@').unwrap_or((spec, ""))
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
    let from_full = from_snapshot(vol_name, from)?;
    let size = info.size_bytes;
    let ranges = ranges_to_send(pool, from_full.as_deref(), to, size)?;
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
    write_ranges(&vol, &ranges, from_full.is_some(), &mut w)?;
    w.finish()
}

/// The full name (`vol@snap`) of the starting snapshot, given as `snap` or
/// `vol@snap`; None for a full stream.
fn from_snapshot(vol_name: &str, from: Option<&str>) -> Result<Option<String>> {
    let Some(f) = from.filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    Ok(Some(match f.split_once('@') {
        Some((v, _)) if v != vol_name => {
            return Err(Error::InvalidArgument(format!(
                "'{f}' is not a snapshot of '{vol_name}'"
            )))
        }
        Some(_) => f.to_string(),
        None => format!("{vol_name}@{f}"),
    }))
}

/// The byte ranges of `to` the stream covers: those that differ from
/// snapshot `from`, or for a full stream those that hold data.
fn ranges_to_send(pool: &Pool, from: Option<&str>, to: &str, size: u64) -> Result<Vec<(u64, u64)>> {
    let Some(f) = from else {
        // A full stream carries only what holds data.
        return pool.mapped_ranges(to);
    };
    let snap = pool.volume_info(f)?;
    if !snap.snapshot {
        return Err(Error::InvalidArgument(format!(
            "'{f}' is not a snapshot (use VOL@SNAP)"
        )));
    }
    // A volume shrunk since FROM differs past its new end too; the
    // stream's size already cuts that off.
    Ok(pool
        .diff(f, to)?
        .into_iter()
        .filter(|&(o, _)| o < size)
        .map(|(o, l)| (o, l.min(size - o)))
        .collect())
}

/// Reads `ranges` of `vol` and writes them as records: all-zero blocks as
/// zero records when the stream has a starting point (`incremental`),
/// otherwise not at all.
fn write_ranges(
    vol: &Volume,
    ranges: &[(u64, u64)],
    incremental: bool,
    w: &mut DiffWriter,
) -> Result<()> {
    let mut buf = vec![0u8; MAX_DATA_RECORD as usize];
    for &(start, len) in ranges {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(MAX_DATA_RECORD) as usize;
            let chunk = &mut buf[..n];
            vol.read(at / SECTOR_SIZE, chunk)?;
            for run in block_runs(chunk) {
                let off = at + run.offset as u64;
                if !run.zero {
                    w.data(off, &chunk[run.offset..run.offset + run.len])?;
                } else if incremental {
                    // Onto the starting point these blocks must read as
                    // zeros; a full stream goes onto an empty volume.
                    w.zero(off, run.len as u64)?;
                }
            }
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

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
