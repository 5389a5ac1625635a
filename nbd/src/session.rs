//! The transmission phase of one connection: reads and writes stream
//! through the engine's I/O queue and are answered as each completes (NBD
//! matches replies to requests by handle, in any order); other commands
//! run alone once everything before them has been answered.
//!
//! One thread reads requests, submits them and answers completions, going
//! back to the socket whenever it has more to read; replies the socket
//! does not take at once go out through `output`'s sender thread.
//!
//! Durability is the vhost server's default: a WRITE, TRIM or
//! WRITE_ZEROES is answered once its mappings are persisted (it survives a
//! kill -9 of the server), after a device flush with FUA; FLUSH makes every
//! write answered before it durable on the device.

use crate::buf::Buf;
use crate::commands::{self, engine_error, Refused};
use crate::handshake::{Ended, Negotiated};
use crate::input::Input;
use crate::output::Output;
use crate::proto::*;
use crate::reply::Batch;
use std::io;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use thinlun::{Completion, IoQueue, QueueOp, Volume};

/// Requests one connection keeps in the engine at most (QEMU's NBD client
/// sends up to 16 at once, fio as many as its iodepth).
const DEPTH: usize = 128;

/// While a request is half arrived and others are in flight, how long the
/// session waits for more of it before looking at completions again.
const PARTIAL_WAIT: Duration = Duration::from_millis(1);

/// A request in the engine's queue, by tag.
struct Meta {
    handle: u64,
    offset: u64,
    cost: usize,
    write: bool,
    fua: bool,
}

/// What a round of taking requests ended on.
enum Took {
    /// The queue is full.
    Depth,
    /// Nothing more has fully arrived.
    Waiting,
    /// No room to admit more (the output's bound).
    Full,
    Disc,
}

enum Next {
    /// A request, with its payload if it is a write.
    Got(Request, Option<Buf>),
    NoInput,
    NoRoom,
}

struct Session<'a> {
    n: &'a Negotiated,
    vol: &'a Volume,
    input: Input<'a>,
    out: Output<'a>,
    queue: IoQueue<Buf>,
    tags: Vec<Option<Meta>>,
    free: Vec<usize>,
    writes_in_flight: usize,
    done: Vec<Completion<Buf>>,
}

/// Serves requests until the client disconnects (DISC or EOF) or breaks
/// the protocol; requests in flight are answered before it returns.
pub fn serve(s: &UnixStream, n: &Negotiated) -> Result<(), Ended> {
    let vol = &*n.export.volume;
    let queue = vol
        .queue(DEPTH)
        .map_err(|e| Ended::Io(io::Error::other(format!("starting an I/O queue: {e}"))))?;
    let mut ses = Session {
        n,
        vol,
        input: Input::new(s),
        out: Output::new(s),
        queue,
        tags: Vec::new(),
        free: Vec::new(),
        writes_in_flight: 0,
        done: Vec::new(),
    };
    let end = ses.run();
    let drained = ses.drain();
    let sent = ses.out.finish().map_err(Ended::Io);
    end.and(drained).and(sent)
}

/// Payload bytes a request holds while outstanding.
fn cost(req: &Request) -> usize {
    match req.kind {
        CMD_READ | CMD_WRITE if req.len <= MAX_PAYLOAD => req.len as usize,
        _ => 0,
    }
}

impl Session<'_> {
    fn run(&mut self) -> Result<(), Ended> {
        loop {
            let took = self.take()?;
            if matches!(took, Took::Disc) {
                return Ok(());
            }
            if self.queue.pending() == 0 {
                continue;
            }
            // Nothing more to take now: wait for a completion or, while a
            // request is half here, for a little more of it (then collect
            // what completed meanwhile).
            let min = if matches!(took, Took::Waiting) && self.input.partial() {
                self.input.wait(PARTIAL_WAIT);
                0
            } else {
                1
            };
            self.queue.complete(min, &mut self.done);
            self.input.rearm();
            self.answer()?;
        }
    }

    fn take(&mut self) -> Result<Took, Ended> {
        while self.queue.pending() < DEPTH {
            // Block on the client only with nothing of ours in flight.
            let block = self.queue.pending() == 0;
            match self.next(block)? {
                Next::Got(req, _) if req.kind == CMD_DISC => return Ok(Took::Disc),
                Next::Got(req, payload) => self.dispatch(req, payload)?,
                Next::NoInput => return Ok(Took::Waiting),
                Next::NoRoom => return Ok(Took::Full),
            }
        }
        Ok(Took::Depth)
    }

    /// The next request that has fully arrived and been admitted.
    fn next(&mut self, block: bool) -> Result<Next, Ended> {
        if !self.input.in_payload() {
            let Some(req) = self.input.header(block)? else {
                return Ok(Next::NoInput);
            };
            if req.kind == CMD_WRITE && req.len > MAX_PAYLOAD {
                // The payload cannot be skipped safely: close.
                return Err(Ended::Protocol(format!("write of {} bytes", req.len)));
            }
            if req.kind != CMD_DISC && !self.out.admit(cost(&req))? {
                if self.queue.pending() > 0 {
                    return Ok(Next::NoRoom);
                }
                // Nothing in flight: waiting for the client holds nothing.
                self.out.wait_room(cost(&req))?;
                if !self.out.admit(cost(&req))? {
                    return Ok(Next::NoRoom); // cannot happen: only we admit
                }
            }
            if req.kind != CMD_WRITE {
                self.input.take_header(req, None);
                return Ok(Next::Got(req, None));
            }
            let buf = self.out.take_buf(req.len as usize);
            self.input.take_header(req, Some(buf));
        }
        Ok(match self.input.payload(block)? {
            Some((req, buf)) => Next::Got(req, Some(buf)),
            None => Next::NoInput,
        })
    }

    fn dispatch(&mut self, req: Request, payload: Option<Buf>) -> Result<(), Ended> {
        let vol = self.vol;
        let read_only = self.n.export.read_only;
        match req.kind {
            CMD_READ => match commands::check_read(vol, &req) {
                Ok(sector) => {
                    let buf = self.out.take_buf(req.len as usize);
                    self.submit(&req, QueueOp::Read { sector, buf });
                    Ok(())
                }
                Err(r) => self.refuse(&req, r),
            },
            CMD_WRITE => {
                let Some(buf) = payload else {
                    // Cannot happen: `next` reads every write's payload.
                    return self.refuse(&req, Refused(NbdError::Io, "no payload".into()));
                };
                match commands::check_write(vol, read_only, &req) {
                    Ok(sector) => {
                        self.submit(&req, QueueOp::Write { sector, buf });
                        Ok(())
                    }
                    Err(r) => {
                        self.out.give_buf(buf);
                        self.refuse(&req, r)
                    }
                }
            }
            CMD_BLOCK_STATUS => {
                // Reads in flight change nothing it reports.
                if self.writes_in_flight > 0 {
                    self.drain()?;
                }
                match commands::block_status(vol, self.n, &req) {
                    Ok(p) => {
                        let mut b = Batch::new(self.n.structured);
                        b.chunk(req.handle, 0, REPLY_TYPE_BLOCK_STATUS, &p);
                        self.out.send(b).map_err(Ended::Io)
                    }
                    Err(r) => self.refuse(&req, r),
                }
            }
            CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE => {
                // FLUSH covers every write answered before it; the others
                // run after the writes before them, as they did in order.
                if req.kind != CMD_CACHE {
                    self.drain()?;
                }
                match commands::change(vol, read_only, &req) {
                    Ok(()) => {
                        let mut b = Batch::new(self.n.structured);
                        b.ok(req.handle, 0);
                        self.out.send(b).map_err(Ended::Io)
                    }
                    Err(r) => self.refuse(&req, r),
                }
            }
            k => self.refuse(
                &req,
                Refused(NbdError::Inval, format!("unknown command {k}")),
            ),
        }
    }

    fn submit(&mut self, req: &Request, op: QueueOp<Buf>) {
        let write = req.kind == CMD_WRITE;
        let meta = Meta {
            handle: req.handle,
            offset: req.offset,
            cost: cost(req),
            write,
            fua: req.flags & CMD_FLAG_FUA != 0,
        };
        let tag = match self.free.pop() {
            Some(t) => {
                self.tags[t] = Some(meta);
                t
            }
            None => {
                self.tags.push(Some(meta));
                self.tags.len() - 1
            }
        };
        self.writes_in_flight += usize::from(write);
        self.queue.submit(tag as u64, op);
    }

    fn refuse(&mut self, req: &Request, Refused(e, msg): Refused) -> Result<(), Ended> {
        log::debug!("nbd '{}': request {}: {msg}", self.n.name, req.kind);
        let mut b = Batch::new(self.n.structured);
        b.err(req.handle, cost(req), e, &msg);
        self.out.send(b).map_err(Ended::Io)
    }

    /// Waits for everything in the engine's queue and answers it.
    fn drain(&mut self) -> Result<(), Ended> {
        self.queue.drain(&mut self.done);
        self.answer()
    }

    /// Answers the completions collected: reads with their data, writes
    /// once their mappings are persisted (flushed, if one asked for FUA).
    fn answer(&mut self) -> Result<(), Ended> {
        if self.done.is_empty() {
            return Ok(());
        }
        let mut b = Batch::new(self.n.structured);
        let mut written: Vec<(u64, usize)> = Vec::new();
        let mut fua = false;
        for c in std::mem::take(&mut self.done) {
            let Some(m) = self.tags.get_mut(c.tag as usize).and_then(Option::take) else {
                continue; // not a tag of ours: cannot happen
            };
            self.free.push(c.tag as usize);
            self.writes_in_flight -= usize::from(m.write);
            let buf = match c.op {
                QueueOp::Read { buf, .. } | QueueOp::Write { buf, .. } => Some(buf),
                _ => None,
            };
            match (c.result, buf) {
                (Ok(()), Some(buf)) if !m.write => b.data(m.handle, m.cost, m.offset, buf),
                (Ok(()), buf) if m.write => {
                    written.push((m.handle, m.cost));
                    fua |= m.fua;
                    if let Some(x) = buf {
                        self.out.give_buf(x);
                    }
                }
                (result, buf) => {
                    let Refused(code, msg) = match result {
                        Err(e) => engine_error(e),
                        // Cannot happen: reads come back with their buffer.
                        Ok(()) => Refused(NbdError::Io, "a read without its buffer".into()),
                    };
                    log::debug!(
                        "nbd '{}': request {m_kind}: {msg}",
                        self.n.name,
                        m_kind = if m.write { "write" } else { "read" }
                    );
                    b.err(m.handle, m.cost, code, &msg);
                    if let Some(x) = buf {
                        self.out.give_buf(x);
                    }
                }
            }
        }
        if !written.is_empty() {
            let durable = if fua {
                self.vol.flush()
            } else {
                self.vol.persist()
            };
            for (handle, cost) in written {
                match &durable {
                    Ok(()) => b.ok(handle, cost),
                    // Unpersisted writes are not reported done.
                    Err(e) => b.err(handle, cost, NbdError::Io, &format!("persisting: {e}")),
                }
            }
        }
        self.out.send(b).map_err(Ended::Io)
    }
}
