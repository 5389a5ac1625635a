//! A vhost-user front end that sends whatever it is told: raw messages
//! (QEMU's docs/interop/vhost-user.rst) with file descriptors attached,
//! and a split virtqueue laid out by hand in a memfd, for the hostile
//! front end tests. Nothing here checks what it sends.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const ADD_MEM_REG: u32 = 37;

const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;

/// VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VHOST_F_LOG_ALL.
pub const F_PROTOCOL: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_LOG_ALL: u64 = 1 << 26;
pub const P_MQ: u64 = 1;
pub const P_LOG_SHMFD: u64 = 1 << 1;
pub const P_REPLY_ACK: u64 = 1 << 3;

/// How long a front end waits for an answer before calling it a hang.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// What the server did with a message that asked for a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A reply: its payload.
    Reply(Vec<u8>),
    /// The server closed the connection.
    Closed,
}

impl Answer {
    /// The u64 of a REPLY_ACK (0 = success) or a u64 reply.
    pub fn value(&self) -> Option<u64> {
        match self {
            Answer::Reply(p) if p.len() >= 8 => Some(u64::from_le_bytes(p[..8].try_into().ok()?)),
            _ => None,
        }
    }

    pub fn refused(&self) -> bool {
        *self == Answer::Closed || self.value().is_some_and(|v| v != 0)
    }
}

pub struct FrontEnd {
    pub sock: UnixStream,
}

impl FrontEnd {
    pub fn connect(path: &Path) -> io::Result<FrontEnd> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        sock.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(FrontEnd { sock })
    }

    /// Sends one message: a 12-byte header, the payload, and `fds` as
    /// SCM_RIGHTS on the header.
    pub fn send(&mut self, req: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&(flags | VERSION).to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        send_with_fds(&self.sock, &msg, fds)
    }

    /// Reads one reply: its payload. EOF is `Closed`; a timeout is an
    /// error (the server hung).
    pub fn recv(&mut self) -> io::Result<Answer> {
        let mut hdr = [0u8; 12];
        match self.sock.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Answer::Closed),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Answer::Closed),
            Err(e) => return Err(e),
        }
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        assert!(
            flags & REPLY != 0,
            "a reply without the reply flag: {hdr:?}"
        );
        let len = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        match self.sock.read_exact(&mut payload) {
            Ok(()) => Ok(Answer::Reply(payload)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Answer::Closed),
            Err(e) => Err(e),
        }
    }

    /// Sends with NEED_REPLY (for requests that reply anyway, as GET_*,
    /// the flag is harmless) and waits for the answer. A send that fails
    /// because the server already closed counts as `Closed`.
    pub fn call(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<Answer> {
        match self.send(req, NEED_REPLY, payload, fds) {
            Ok(()) => {}
            Err(e) if closed(&e) => return Ok(Answer::Closed),
            Err(e) => return Err(e),
        }
        self.recv()
    }

    /// The handshake QEMU does before anything else: owner, features with
    /// REPLY_ACK (so every SET_* is answered), MQ and LOG_SHMFD.
    pub fn handshake(&mut self) -> io::Result<()> {
        let feats = self
            .call(GET_FEATURES, &[], &[])?
            .value()
            .expect("features");
        self.send(SET_OWNER, 0, &[], &[])?;
        let want = feats & (F_PROTOCOL | F_VERSION_1);
        self.send(SET_FEATURES, 0, &want.to_le_bytes(), &[])?;
        let proto = self
            .call(GET_PROTOCOL_FEATURES, &[], &[])?
            .value()
            .expect("protocol features");
        let p = proto & (P_MQ | P_REPLY_ACK | P_LOG_SHMFD);
        self.send(SET_PROTOCOL_FEATURES, 0, &p.to_le_bytes(), &[])?;
        // An answered request proves the server read all of the above.
        assert!(self.call(GET_QUEUE_NUM, &[], &[])?.value().is_some());
        Ok(())
    }

    /// The server still answers on this connection.
    pub fn alive(&mut self) -> bool {
        matches!(self.call(GET_FEATURES, &[], &[]), Ok(Answer::Reply(_)))
    }
}

pub fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: a zeroed msghdr is valid; every pointer set below points to
    // live buffers (`iov`, `cbuf`) that outlive the sendmsg call, and the
    // control message is written within `cbuf`'s `space` bytes.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                fds.len(),
            );
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != bytes.len() {
            // Rest of a large message: plain writes.
            use std::io::Write;
            (&*sock).write_all(&bytes[n as usize..])?;
        }
    }
    Ok(())
}

/// A memfd of `len` bytes; `sealable` allows the server to seal it.
pub fn memfd(len: u64, sealable: bool) -> File {
    let flags = if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a fresh descriptor, owned by the File.
    let file = unsafe {
        let fd = libc::memfd_create(c"thinlun-hostile".as_ptr(), flags);
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        File::from_raw_fd(fd)
    };
    file.set_len(len).unwrap();
    file
}

pub fn eventfd() -> File {
    // SAFETY: a fresh descriptor, owned by the File.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK);
        assert!(fd >= 0);
        File::from_raw_fd(fd)
    }
}

pub fn kick(fd: &File) {
    let one = 1u64.to_le_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr() as *const libc::c_void, 8) };
}

/// One region of a memory table: guest physical address, size, the
/// front end's virtual address, offset in the file.
#[derive(Clone, Copy)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub uva: u64,
    pub offset: u64,
}

pub fn mem_table(regions: &[Region]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        for v in [r.gpa, r.size, r.uva, r.offset] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// ADD_MEM_REG's payload: padding, then one region.
pub fn one_region(r: Region) -> Vec<u8> {
    let mut p = 0u64.to_le_bytes().to_vec();
    for v in [r.gpa, r.size, r.uva, r.offset] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [desc, used, avail, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// Guest memory laid out by hand: one region at guest address 0 and at
/// `UVA` in the front end's (pretended) address space, with queue 0's
/// descriptor table, avail and used rings at fixed offsets, mapped here
/// so requests can be written into it.
pub struct GuestMem {
    pub file: File,
    pub len: u64,
    ptr: *mut u8,
}

pub const UVA: u64 = 0x7f00_0000_0000;
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const DATA: u64 = 0x10000;
pub const RING: u16 = 16;

impl GuestMem {
    pub fn new(len: u64, sealable: bool) -> GuestMem {
        let file = memfd(len, sealable);
        // SAFETY: maps the whole memfd shared; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestMem {
            file,
            len,
            ptr: ptr as *mut u8,
        }
    }

    pub fn region(&self) -> Region {
        Region {
            gpa: 0,
            size: self.len,
            uva: UVA,
            offset: 0,
        }
    }

    pub fn put(&self, off: u64, bytes: &[u8]) {
        assert!(off + bytes.len() as u64 <= self.len);
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off as usize), bytes.len())
        }
    }

    pub fn get(&self, off: u64, len: usize) -> Vec<u8> {
        assert!(off + len as u64 <= self.len);
        let mut v = vec![0u8; len];
        // SAFETY: inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off as usize), v.as_mut_ptr(), len) }
        v
    }

    /// Writes a 4 KiB read of sector 0 as chain `slot`: header, data,
    /// status descriptors, and makes it available.
    pub fn queue_read(&self, slot: u16, avail_idx: u16) {
        let base = DATA + u64::from(slot) * 0x2000;
        let (hdr, data, status) = (base, base + 0x100, base + 0x1100);
        let mut h = [0u8; 16]; // type 0 (IN), sector 0
        h[..4].copy_from_slice(&0u32.to_le_bytes());
        self.put(hdr, &h);
        let d = u64::from(slot) * 3;
        self.desc(d, hdr, 16, 1, d as u16 + 1); // NEXT
        self.desc(d + 1, data, 4096, 1 | 2, d as u16 + 2); // NEXT | WRITE
        self.desc(d + 2, status, 1, 2, 0);
        self.put(status, &[0xee]);
        let ring_at = AVAIL + 4 + 2 * u64::from(avail_idx % RING);
        self.put(ring_at, &(d as u16).to_le_bytes());
        self.put(AVAIL + 2, &(avail_idx + 1).to_le_bytes());
    }

    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut e = Vec::with_capacity(16);
        e.extend_from_slice(&addr.to_le_bytes());
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&next.to_le_bytes());
        self.put(DESC + i * 16, &e);
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le_bytes(self.get(USED + 2, 2).try_into().unwrap())
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len as usize) };
    }
}

/// Sets up queue 0 at the fixed offsets of [`GuestMem`] and starts it: NUM, ADDR, BASE, CALL, KICK,
/// ENABLE, each acknowledged. Returns the kick and call eventfds.
pub fn start_queue(fe: &mut FrontEnd) -> io::Result<(File, File)> {
    let ok = |a: Answer| assert_eq!(a.value(), Some(0), "queue setup refused");
    ok(fe.call(SET_VRING_NUM, &vring_state(0, u32::from(RING)), &[])?);
    ok(fe.call(
        SET_VRING_ADDR,
        &vring_addr(0, UVA + DESC, UVA + USED, UVA + AVAIL),
        &[],
    )?);
    ok(fe.call(SET_VRING_BASE, &vring_state(0, 0), &[])?);
    let (kick_fd, call_fd) = (eventfd(), eventfd());
    ok(fe.call(SET_VRING_CALL, &0u64.to_le_bytes(), &[call_fd.as_raw_fd()])?);
    ok(fe.call(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick_fd.as_raw_fd()])?);
    ok(fe.call(SET_VRING_ENABLE, &vring_state(0, 1), &[])?);
    Ok((kick_fd, call_fd))
}
