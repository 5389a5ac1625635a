//! The transmission phase of one connection: requests answered in order.
//!
//! Durability is the vhost server's default: a completed WRITE, TRIM or
//! WRITE_ZEROES has its mappings persisted (it survives a kill -9 of the
//! server), FUA and FLUSH make it durable on the device.

use crate::handshake::{Ended, Negotiated};
use crate::proto::*;
use std::io::{IoSlice, Read, Write};
use thinlun::{Error, Volume, SECTOR_SIZE};

/// Largest piece of zeros written at once for WRITE_ZEROES with NO_HOLE.
const ZERO_PIECE: usize = 1 << 20;

/// Reply headers, encoded for one vectored write with their payloads.
struct Heads {
    structured: bool,
    bytes: Vec<u8>,
}

impl Heads {
    fn new(structured: bool) -> Heads {
        Heads {
            structured,
            bytes: Vec::with_capacity(1024),
        }
    }

    fn ok(&mut self, handle: u64) {
        if self.structured {
            let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
            self.bytes.extend_from_slice(&h);
        } else {
            self.bytes.extend_from_slice(&simple_reply(handle, 0));
        }
    }

    fn err(&mut self, handle: u64, e: NbdError, msg: &str) {
        if self.structured {
            self.bytes.extend_from_slice(&error_chunk(handle, e, msg));
        } else {
            self.bytes
                .extend_from_slice(&simple_reply(handle, e as u32));
        }
    }

    /// The header of a read's data, which follows it.
    fn data(&mut self, handle: u64, offset: u64, len: usize) {
        if self.structured {
            let kind = REPLY_TYPE_OFFSET_DATA;
            let h = chunk_header(REPLY_FLAG_DONE, kind, handle, 8 + len as u32);
            self.bytes.extend_from_slice(&h);
            self.bytes.extend_from_slice(&offset.to_be_bytes());
        } else {
            self.bytes.extend_from_slice(&simple_reply(handle, 0));
        }
    }

    /// The header of a chunk of `kind` whose payload follows it.
    fn chunk(&mut self, handle: u64, kind: u16, len: usize) {
        let h = chunk_header(REPLY_FLAG_DONE, kind, handle, len as u32);
        self.bytes.extend_from_slice(&h);
    }
}

/// Pieces of the replies to send: header bytes and payloads, in order.
enum Piece<'a> {
    Head(std::ops::Range<usize>),
    Payload(&'a [u8]),
}

/// Sends the pieces with as few system calls as the socket allows (std's
/// `write_all_vectored` is not stable).
fn send(s: &mut impl Write, heads: &Heads, pieces: &[Piece<'_>]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces
        .iter()
        .map(|p| match p {
            Piece::Head(r) => IoSlice::new(&heads.bytes[r.clone()]),
            Piece::Payload(d) => IoSlice::new(d),
        })
        .filter(|sl| !sl.is_empty())
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = s.write_vectored(rest)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Adds a header written by `f` to `pieces`.
fn head(heads: &mut Heads, pieces: &mut Vec<Piece<'_>>, f: impl FnOnce(&mut Heads)) {
    let at = heads.bytes.len();
    f(heads);
    pieces.push(Piece::Head(at..heads.bytes.len()));
}

/// What a request that ran alone answers.
enum Answer {
    /// The read's data, in its buffer.
    Data,
    /// A block status chunk's payload.
    Status(Vec<u8>),
    Done,
}

/// A request the export cannot run, as the client hears it.
struct Refused(NbdError, String);

fn engine_error(e: Error) -> Refused {
    match e {
        Error::NoSpace => Refused(NbdError::NoSpc, "the pool is full".into()),
        e => Refused(NbdError::Io, e.to_string()),
    }
}

/// Requests taken into one engine batch at most.
const MAX_BATCH: usize = 32;

/// Payload buffers a connection keeps for reuse, in bytes at most: a
/// fresh buffer per request costs an allocation and page faults (large
/// ones are mapped anew each time) and zeroing.
const SPARE_BYTES: usize = 16 << 20;

/// Payload buffers of finished requests, for the next ones.
#[derive(Default)]
struct Spare {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Spare {
    /// A buffer of `len` bytes; what it held before is left (the caller
    /// overwrites it).
    fn take(&mut self, len: usize) -> Vec<u8> {
        let mut b = match self.bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let b = self.bufs.swap_remove(i);
                self.bytes -= b.capacity();
                b
            }
            None => Vec::new(),
        };
        // Zero-fills only what the buffer never held.
        b.resize(len, 0);
        b
    }

    fn give(&mut self, b: Vec<u8>) {
        if b.capacity() > 0 && self.bytes + b.capacity() <= SPARE_BYTES {
            self.bytes += b.capacity();
            self.bufs.push(b);
        }
    }
}

/// One request and its payload, read off the wire.
struct Queued {
    req: Request,
    data: Vec<u8>,
}

/// Serves requests until the client disconnects (DISC or EOF) or breaks
/// the protocol. `more_waiting` says whether the client has sent more
/// than was read (for batching; `false` serves one request at a time).
///
/// Reads and writes already queued on the socket run as one engine batch
/// (the engine keeps them in flight together, as a deep queue needs), with
/// one persist for the batch's writes; other commands run alone, in order.
pub fn serve<S: Read + Write>(
    s: &mut S,
    n: &Negotiated,
    mut more_waiting: impl FnMut(&S) -> bool,
) -> Result<(), Ended> {
    let vol = &*n.export.volume;
    let mut spare = Spare::default();
    loop {
        let mut batch = vec![read_request(s, &mut spare)?];
        while batch.len() < MAX_BATCH
            && batch.last().is_some_and(|q| batchable(vol, n, &q.req))
            && more_waiting(s)
        {
            batch.push(read_request(s, &mut spare)?);
        }
        let tail = match batch.last() {
            Some(q) if !batchable(vol, n, &q.req) => batch.pop(),
            _ => None,
        };
        if !batch.is_empty() {
            run_batch(s, n, &mut batch)?;
        }
        if let Some(q) = tail {
            if q.req.kind == CMD_DISC {
                return Ok(());
            }
            let mut q = q;
            run_one(s, n, &mut q, &mut spare)?;
            batch.push(q);
        }
        for q in batch {
            spare.give(q.data);
        }
    }
}

fn read_request<S: Read>(s: &mut S, spare: &mut Spare) -> Result<Queued, Ended> {
    let mut h = [0u8; REQUEST_BYTES];
    s.read_exact(&mut h)?;
    let req = parse_request(&h).map_err(|_| Ended::Protocol("bad request magic".into()))?;
    let data = match req.kind {
        CMD_WRITE if req.len > MAX_PAYLOAD => {
            // The payload cannot be skipped safely: close.
            return Err(Ended::Protocol(format!("write of {} bytes", req.len)));
        }
        CMD_WRITE => {
            let mut data = spare.take(req.len as usize);
            s.read_exact(&mut data)?;
            data
        }
        // A read's buffer, if it is valid (sizes are checked later).
        CMD_READ if req.len <= MAX_PAYLOAD => spare.take(req.len as usize),
        _ => Vec::new(),
    };
    Ok(Queued { req, data })
}

/// A plain, valid READ or WRITE: it can share an engine batch.
fn batchable(vol: &Volume, n: &Negotiated, r: &Request) -> bool {
    let write = r.kind == CMD_WRITE && !n.export.read_only && r.flags & CMD_FLAG_FUA == 0;
    (r.kind == CMD_READ || write)
        && r.len <= MAX_PAYLOAD
        && sectors(vol, r, NbdError::Inval).is_ok()
}

fn run_batch<S: Write>(s: &mut S, n: &Negotiated, batch: &mut [Queued]) -> Result<(), Ended> {
    let vol = &*n.export.volume;
    let mut reqs: Vec<thinlun::Request<'_>> = batch
        .iter_mut()
        .map(|q| {
            let sector = q.req.offset / SECTOR_SIZE;
            if q.req.kind == CMD_READ {
                thinlun::Request::Read {
                    sector,
                    buf: &mut q.data,
                }
            } else {
                thinlun::Request::Write {
                    sector,
                    data: &q.data,
                }
            }
        })
        .collect();
    let mut results: Vec<Result<(), Refused>> = vol
        .submit(&mut reqs)
        .into_iter()
        .map(|r| r.map_err(engine_error))
        .collect();
    drop(reqs);
    let is_write = |q: &Queued| q.req.kind == CMD_WRITE;
    if batch
        .iter()
        .zip(&results)
        .any(|(q, r)| is_write(q) && r.is_ok())
    {
        if let Err(e) = vol.persist() {
            // Unpersisted writes are not reported done.
            for (q, r) in batch.iter().zip(results.iter_mut()) {
                if is_write(q) && r.is_ok() {
                    *r = Err(Refused(NbdError::Io, format!("persisting: {e}")));
                }
            }
        }
    }
    // Every reply of the batch in one vectored write.
    let mut heads = Heads::new(n.structured);
    let mut pieces = Vec::with_capacity(batch.len() * 2);
    for (q, r) in batch.iter().zip(results) {
        let handle = q.req.handle;
        match r {
            Ok(()) if q.req.kind == CMD_READ => {
                head(&mut heads, &mut pieces, |h| {
                    h.data(handle, q.req.offset, q.data.len())
                });
                pieces.push(Piece::Payload(&q.data));
            }
            Ok(()) => head(&mut heads, &mut pieces, |h| h.ok(handle)),
            Err(Refused(code, msg)) => {
                log::debug!("nbd '{}': request {}: {msg}", n.name, q.req.kind);
                head(&mut heads, &mut pieces, |h| h.err(handle, code, &msg));
            }
        }
    }
    send(s, &heads, &pieces)?;
    Ok(())
}

fn run_one<S: Write>(
    s: &mut S,
    n: &Negotiated,
    q: &mut Queued,
    spare: &mut Spare,
) -> Result<(), Ended> {
    let vol = &*n.export.volume;
    let req = &q.req;
    let handle = req.handle;
    let outcome = match req.kind {
        CMD_READ => read(vol, req, &mut q.data, spare).map(|()| Answer::Data),
        CMD_BLOCK_STATUS => block_status(vol, n, req).map(Answer::Status),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH | CMD_CACHE => {
            change(vol, n.export.read_only, req, &q.data).map(|()| Answer::Done)
        }
        k => Err(Refused(NbdError::Inval, format!("unknown command {k}"))),
    };
    let mut heads = Heads::new(n.structured);
    let mut pieces = Vec::with_capacity(2);
    match &outcome {
        Ok(Answer::Data) => {
            head(&mut heads, &mut pieces, |h| {
                h.data(handle, req.offset, q.data.len())
            });
            pieces.push(Piece::Payload(&q.data));
        }
        Ok(Answer::Status(p)) => {
            head(&mut heads, &mut pieces, |h| {
                h.chunk(handle, REPLY_TYPE_BLOCK_STATUS, p.len())
            });
            pieces.push(Piece::Payload(p));
        }
        Ok(Answer::Done) => head(&mut heads, &mut pieces, |h| h.ok(handle)),
        Err(Refused(e, msg)) => {
            log::debug!("nbd '{}': request {}: {msg}", n.name, req.kind);
            head(&mut heads, &mut pieces, |h| h.err(handle, *e, msg));
        }
    }
    send(s, &heads, &pieces)?;
    Ok(())
}

/// The sectors of a byte range, refused when unaligned, empty or past
/// the end (`past_end` is the error the command reports for that).
fn sectors(vol: &Volume, req: &Request, past_end: NbdError) -> Result<(u64, u64), Refused> {
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

/// A read that could not join a batch (or failed its checks there).
fn read(vol: &Volume, req: &Request, buf: &mut Vec<u8>, spare: &mut Spare) -> Result<(), Refused> {
    if req.len > MAX_PAYLOAD {
        return Err(Refused(
            NbdError::Overflow,
            format!("read of {} bytes", req.len),
        ));
    }
    let (sector, _) = sectors(vol, req, NbdError::Inval)?;
    if buf.len() != req.len as usize {
        *buf = spare.take(req.len as usize);
    }
    vol.read(sector, buf).map_err(engine_error)
}

fn change(vol: &Volume, read_only: bool, req: &Request, data: &[u8]) -> Result<(), Refused> {
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
        CMD_WRITE => vol.write(sector, data),
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
fn block_status(vol: &Volume, n: &Negotiated, req: &Request) -> Result<Vec<u8>, Refused> {
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
