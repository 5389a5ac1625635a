//! The receive side of one connection: request headers and write
//! payloads, read either blocking (when the session has nothing in flight)
//! or only as far as the socket has bytes now, so the session can go back
//! to its completions instead of waiting on a slow or stalled client.

use crate::buf::Buf;
use crate::handshake::Ended;
use crate::proto::{parse_request, Request, REQUEST_BYTES};
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Bytes read ahead: many small requests per system call.
const READ_AHEAD: usize = 1 << 20;
/// A payload remainder at most this large is read through the read-ahead
/// buffer (which also picks up the requests behind it); larger ones go
/// straight into their own buffer.
const SMALL_REST: usize = 64 << 10;

/// A write whose payload is still arriving.
struct Partial {
    req: Request,
    buf: Buf,
    got: usize,
}

/// Bytes received but not yet consumed: `buf[start..end]`.
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    fn len(&self) -> usize {
        self.end - self.start
    }

    /// One receive into the free end (moving what is left to the front
    /// first when the free end runs short). Returns whether anything came,
    /// and whether the socket was drained (the read left room).
    fn fill(&mut self, s: &UnixStream, block: bool) -> Result<(bool, bool), Ended> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < SMALL_REST {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let space = self.buf.len() - self.end;
        let n = recv(s, &mut self.buf[self.end..], block)?;
        self.end += n;
        Ok((n > 0, n < space))
    }
}

pub struct Input<'a> {
    s: &'a UnixStream,
    ahead: ReadAhead,
    partial: Option<Partial>,
    /// The last read found the socket empty (or drained it): reading
    /// again before the session has waited for something would only cost
    /// a system call.
    dry: bool,
}

impl<'a> Input<'a> {
    pub fn new(s: &'a UnixStream) -> Input<'a> {
        Input {
            s,
            ahead: ReadAhead {
                buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
                start: 0,
                end: 0,
            },
            partial: None,
            dry: false,
        }
    }

    /// Whether part of a request has arrived and the rest has not.
    pub fn partial(&self) -> bool {
        self.partial.is_some() || self.ahead.len() > 0
    }

    pub fn in_payload(&self) -> bool {
        self.partial.is_some()
    }

    /// The session has waited (for completions): more may have arrived.
    pub fn rearm(&mut self) {
        self.dry = false;
    }

    /// Waits up to `t` for bytes to read.
    pub fn wait(&mut self, t: Duration) {
        self.dry = false;
        let mut p = libc::pollfd {
            fd: self.s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = t.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut p, 1, ms) };
    }

    /// The next request header, not yet taken, if it has arrived (after
    /// waiting for it when `block`).
    pub fn header(&mut self, block: bool) -> Result<Option<Request>, Ended> {
        while self.ahead.len() < REQUEST_BYTES {
            if !self.fill(block)? {
                return Ok(None);
            }
        }
        let mut h = [0u8; REQUEST_BYTES];
        let at = self.ahead.start;
        h.copy_from_slice(&self.ahead.buf[at..at + REQUEST_BYTES]);
        parse_request(&h)
            .map(Some)
            .map_err(|_| Ended::Protocol("bad request magic".into()))
    }

    /// Takes the header [`Input::header`] returned; a write's payload then
    /// goes into `payload` (of the write's length).
    pub fn take_header(&mut self, req: Request, payload: Option<Buf>) {
        self.ahead.start += REQUEST_BYTES;
        if let Some(buf) = payload {
            self.partial = Some(Partial { req, buf, got: 0 });
        }
    }

    /// The write whose payload is being read, once all of it is here.
    pub fn payload(&mut self, block: bool) -> Result<Option<(Request, Buf)>, Ended> {
        let Some(p) = self.partial.as_mut() else {
            return Ok(None);
        };
        loop {
            let want = p.buf.len() - p.got;
            let n = want.min(self.ahead.len());
            let at = self.ahead.start;
            p.buf[p.got..p.got + n].copy_from_slice(&self.ahead.buf[at..at + n]);
            self.ahead.start += n;
            p.got += n;
            if p.got == p.buf.len() {
                break;
            }
            let rest = p.buf.len() - p.got;
            if self.dry && !block {
                return Ok(None);
            }
            let read = if rest <= SMALL_REST {
                let (read, dry) = self.ahead.fill(self.s, block)?;
                self.dry = dry;
                read
            } else {
                let n = recv(self.s, &mut p.buf[p.got..], block)?;
                p.got += n;
                self.dry = p.got < p.buf.len();
                n > 0
            };
            if !read {
                return Ok(None);
            }
        }
        Ok(self.partial.take().map(|p| (p.req, p.buf)))
    }

    /// Reads more into the read-ahead buffer; false when nothing was there
    /// (never when `block`).
    fn fill(&mut self, block: bool) -> Result<bool, Ended> {
        if self.dry && !block {
            return Ok(false);
        }
        let (read, dry) = self.ahead.fill(self.s, block)?;
        self.dry = dry;
        Ok(read)
    }
}

/// One read from the socket: 0 means nothing there now (never when
/// `block`); the end of the stream is `Ended::Quit`.
fn recv(s: &UnixStream, buf: &mut [u8], block: bool) -> Result<usize, Ended> {
    loop {
        let r = if block {
            let mut s = s;
            s.read(buf)
        } else {
            // SAFETY: `buf` is valid for writes of its length for the call.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        };
        match r {
            Ok(0) if !buf.is_empty() => return Err(Ended::Quit),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !block => return Ok(0),
            Err(e) => return Err(Ended::Io(e)),
        }
    }
}
