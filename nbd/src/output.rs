//! The send side of one connection, and its bound on memory.
//!
//! The session thread sends replies itself, without blocking, while the
//! socket takes them. What the socket does not take at once (large reads,
//! a client slow to read) goes to a sender thread, started on first need,
//! which finishes it in order with blocking writes. So the session thread
//! never waits for the client while it has engine I/O in flight: a client
//! that stops reading cannot keep that I/O's stripe locks held, which
//! would stall other connections writing there.
//!
//! Every request is admitted before it is read and released when its
//! reply is sent, so requests and payload bytes between the two are
//! bounded per connection.

use crate::buf::{Buf, Spare};
use crate::reply::Batch;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Requests admitted and not yet answered, at most.
const MAX_REQUESTS: usize = 512;
/// Their payload bytes, at most (a single larger request is admitted when
/// nothing else is outstanding; payloads are at most 32 MiB).
const MAX_BYTES: usize = 64 << 20;
/// Slices in one sendmsg: Linux's IOV_MAX.
const MAX_IOV: usize = 1024;

#[derive(Default)]
struct State {
    queue: VecDeque<Batch>,
    /// The sender thread is sending (or has batches to send): the session
    /// thread must queue its replies behind them.
    busy: bool,
    closing: bool,
    /// Why sending failed; the connection is over.
    dead: Option<io::ErrorKind>,
    requests: usize,
    bytes: usize,
    spare: Spare,
}

impl State {
    fn fits(&self, cost: usize) -> bool {
        self.requests == 0 || (self.requests < MAX_REQUESTS && self.bytes + cost <= MAX_BYTES)
    }

    fn release(&mut self, b: &Batch) {
        self.requests = self.requests.saturating_sub(b.len());
        self.bytes = self.bytes.saturating_sub(b.cost);
    }

    fn check(&self) -> io::Result<()> {
        match self.dead {
            Some(kind) => Err(io::Error::new(kind, "sending replies failed")),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
struct Shared {
    st: Mutex<State>,
    /// Work for the sender, room or the end of sending for the session.
    cv: Condvar,
}

pub struct Output<'a> {
    stream: &'a UnixStream,
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
    freed: Vec<Buf>,
}

impl<'a> Output<'a> {
    pub fn new(stream: &'a UnixStream) -> Output<'a> {
        Output {
            stream,
            shared: Arc::default(),
            sender: None,
            freed: Vec::new(),
        }
    }

    /// Counts a request with `cost` payload bytes as outstanding, if there
    /// is room for it.
    pub fn admit(&self, cost: usize) -> io::Result<bool> {
        let mut st = self.shared.st.lock();
        st.check()?;
        let fits = st.fits(cost);
        if fits {
            st.requests += 1;
            st.bytes += cost;
        }
        Ok(fits)
    }

    /// Waits until a request of `cost` bytes would be admitted. Only for a
    /// session with nothing in flight in the engine.
    pub fn wait_room(&self, cost: usize) -> io::Result<()> {
        let mut st = self.shared.st.lock();
        while st.dead.is_none() && !st.fits(cost) {
            self.shared.cv.wait(&mut st);
        }
        st.check()
    }

    pub fn take_buf(&self, len: usize) -> Buf {
        self.shared.st.lock().spare.take(len)
    }

    pub fn give_buf(&self, b: Buf) {
        self.shared.st.lock().spare.give(b);
    }

    /// Sends a batch, or what of it the socket takes now and the rest
    /// through the sender thread. Never waits for the client.
    pub fn send(&mut self, mut batch: Batch) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let direct = {
            let st = self.shared.st.lock();
            st.check()?;
            !st.busy && st.queue.is_empty()
        };
        let mut failed = None;
        if direct {
            while !batch.done() {
                match send_some(self.stream.as_raw_fd(), &batch, true) {
                    Ok(n) => batch.advance(n, &mut self.freed),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        let mut st = self.shared.st.lock();
        for b in self.freed.drain(..) {
            st.spare.give(b);
        }
        if let Some(e) = failed {
            st.dead = Some(e.kind());
            return Err(e);
        }
        if batch.done() {
            st.release(&batch);
            return Ok(());
        }
        st.queue.push_back(batch);
        st.busy = true;
        drop(st);
        self.shared.cv.notify_all();
        if self.sender.is_none() {
            self.start_sender()?;
        }
        Ok(())
    }

    fn start_sender(&mut self) -> io::Result<()> {
        let started = self.stream.try_clone().and_then(|s| {
            let sh = self.shared.clone();
            std::thread::Builder::new()
                .name("nbd-send".into())
                .spawn(move || sender(&sh, &s))
        });
        match started {
            Ok(t) => {
                self.sender = Some(t);
                Ok(())
            }
            Err(e) => {
                self.shared.st.lock().dead = Some(e.kind());
                Err(e)
            }
        }
    }

    /// Sends everything queued and stops the sender thread; Err if some
    /// reply could not be sent.
    pub fn finish(&mut self) -> io::Result<()> {
        self.shared.st.lock().closing = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        self.shared.st.lock().check()
    }
}

impl Drop for Output<'_> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The sender thread: sends queued batches in order, blocking.
fn sender(sh: &Shared, s: &UnixStream) {
    let mut freed = Vec::new();
    loop {
        let batches: Vec<Batch> = {
            let mut st = sh.st.lock();
            while st.queue.is_empty() && !st.closing && st.dead.is_none() {
                st.busy = false;
                sh.cv.notify_all();
                sh.cv.wait(&mut st);
            }
            if st.queue.is_empty() || st.dead.is_some() {
                st.busy = false;
                sh.cv.notify_all();
                return;
            }
            st.queue.drain(..).collect()
        };
        for mut b in batches {
            let mut result = Ok(());
            while !b.done() && result.is_ok() {
                result = send_some(s.as_raw_fd(), &b, false).map(|n| b.advance(n, &mut freed));
            }
            let mut st = sh.st.lock();
            for f in freed.drain(..) {
                st.spare.give(f);
            }
            if let Err(e) = result {
                st.dead = Some(e.kind());
                st.queue.clear();
                st.busy = false;
                drop(st);
                sh.cv.notify_all();
                return;
            }
            st.release(&b);
            drop(st);
            // The session may be waiting for room.
            sh.cv.notify_all();
        }
    }
}

/// One sendmsg of a batch's unsent bytes; `nonblocking` returns
/// WouldBlock instead of waiting for room in the socket.
fn send_some(fd: RawFd, b: &Batch, nonblocking: bool) -> io::Result<usize> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(b.len() * 2);
    b.slices(MAX_IOV, &mut slices);
    let mut flags = libc::MSG_NOSIGNAL;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix (std documents it);
        // the kernel only reads through the pointer.
        m.msg_iov = slices.as_mut_ptr().cast::<libc::iovec>();
        m.msg_iovlen = slices.len() as _;
        // SAFETY: `m` points at `slices`, valid for the call; `fd` is the
        // connection's socket, open for as long as the connection.
        let n = unsafe { libc::sendmsg(fd, &m, flags) };
        if n >= 0 {
            return match n {
                0 if !slices.is_empty() => Err(io::ErrorKind::WriteZero.into()),
                n => Ok(n as usize),
            };
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
