//! Checks of a request's range, and the commands that run alone, in
//! order, outside the engine's I/O queue: TRIM, WRITE_ZEROES, FLUSH, CACHE
//! and BLOCK_STATUS.

use crate::handshake::Negotiated;
use crate::proto::*;
use thinlun::{Error, Volume, SECTOR_SIZE};

/// Largest piece of zeros written at once for WRITE_ZEROES with NO_HOLE.
const ZERO_PIECE: usize = 1 << 20;

/// A request the export cannot run, as the client hears it.
pub struct Refused(pub NbdError, pub String);

pub fn engine_error(e: Error) -> Refused {
    match e {
        Error::NoSpace => Refused(NbdError::NoSpc, "the pool is full".into()),
        e => Refused(NbdError::Io, e.to_string()),
    }
}

/// The sectors of a byte range, refused when unaligned, empty or past
/// the end (`past_end` is the error the command reports for that).
pub fn sectors(vol: &Volume, req: &Request, past_end: NbdError) -> Result<(u64, u64), Refused> {
    let (off, len) = (req.offset, u64::from(req.len));
    if len == 0 {
        return Err(Refused(NbdError::Inval, "zero length".into()));
    }
    if off % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
        return Err(Refused(
            NbdError::Inval,
            format!("offset {off} and length {len} must be multiples of {SECTOR_SIZE}"),
        ));
    }
    if off.checked_add(len).is_none_or(|e| e > vol.size_bytes()) {
        return Err(Refused(
            past_end,
            format!("{off}+{len} is past the end ({} bytes)", vol.size_bytes()),
        ));
    }
    Ok((off / SECTOR_SIZE, len / SECTOR_SIZE))
}

/// Why a READ cannot go to the engine, if it cannot.
pub fn check_read(vol: &Volume, req: &Request) -> Result<u64, Refused> {
    if req.len > MAX_PAYLOAD {
        return Err(Refused(
            NbdError::Overflow,
            format!("read of {} bytes", req.len),
        ));
    }
    sectors(vol, req, NbdError::Inval).map(|(s, _)| s)
}

/// Why a WRITE cannot go to the engine, if it cannot.
pub fn check_write(vol: &Volume, read_only: bool, req: &Request) -> Result<u64, Refused> {
    if read_only {
        return Err(Refused(NbdError::Perm, "the export is read-only".into()));
    }
    sectors(vol, req, NbdError::NoSpc).map(|(s, _)| s)
}

/// FLUSH, CACHE, TRIM and WRITE_ZEROES (with what a completed change
/// needs for durability).
pub fn change(vol: &Volume, read_only: bool, req: &Request) -> Result<(), Refused> {
    match req.kind {
        CMD_FLUSH => return vol.flush().map_err(engine_error),
        // A hint only: the engine reads from the device each time.
        CMD_CACHE => return sectors(vol, req, NbdError::Inval).map(|_| ()),
        _ => {}
    }
    if read_only {
        return Err(Refused(NbdError::Perm, "the export is read-only".into()));
    }
    let past_end = if req.kind == CMD_TRIM {
        NbdError::Inval
    } else {
        NbdError::NoSpc
    };
    let (sector, count) = sectors(vol, req, past_end)?;
    match req.kind {
        CMD_TRIM => vol.discard(sector, count),
        _ if req.flags & CMD_FLAG_NO_HOLE == 0 => vol.write_zeroes(sector, count),
        // Allocated zeros need data writes: not fast.
        _ if req.flags & CMD_FLAG_FAST_ZERO != 0 => {
            return Err(Refused(
                NbdError::NotSup,
                "zeroing without holes is slow".into(),
            ));
        }
        _ => write_zeros(vol, sector, count),
    }
    .map_err(engine_error)?;
    if req.flags & CMD_FLAG_FUA != 0 {
        vol.flush()
    } else {
        vol.persist()
    }
    .map_err(engine_error)
}

fn write_zeros(vol: &Volume, sector: u64, count: u64) -> thinlun::Result<()> {
    let zeros = vec![0u8; ZERO_PIECE];
    let per = ZERO_PIECE as u64 / SECTOR_SIZE;
    let mut at = 0;
    while at < count {
        let n = per.min(count - at);
        vol.write(sector + at, &zeros[..(n * SECTOR_SIZE) as usize])?;
        at += n;
    }
    Ok(())
}

/// The base:allocation descriptors of a range: (length, flags) pairs.
pub fn block_status(vol: &Volume, n: &Negotiated, req: &Request) -> Result<Vec<u8>, Refused> {
    if !n.allocation {
        return Err(Refused(
            NbdError::Inval,
            "no metadata context was selected".into(),
        ));
    }
    let (off, len) = (req.offset, u64::from(req.len));
    if len == 0 || off.checked_add(len).is_none_or(|e| e > vol.size_bytes()) {
        return Err(Refused(
            NbdError::Inval,
            format!("{off}+{len} is out of range"),
        ));
    }
    let runs = vol.allocation(off, len).map_err(engine_error)?;
    let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (run, stored) in runs {
        // Runs are within the request, so they fit in 32 bits.
        let flags = if stored { 0 } else { STATE_HOLE | STATE_ZERO };
        p.extend_from_slice(&(run as u32).to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            break;
        }
    }
    Ok(p)
}
