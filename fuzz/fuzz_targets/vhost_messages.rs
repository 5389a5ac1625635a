#![no_main]
//! Sequences of vhost-user messages against the vhost-user-blk server: a
//! `Server` of one volume (a pool in memory) on a socket, and a front end
//! that sends what the input says (request, flags, payload, descriptors:
//! memfds of any size, eventfds, a pipe), writes input bytes into its guest
//! memory, truncates it, and kicks queues. The server must answer or close
//! (never panic, never fault: a SIGBUS from guest memory is contained), and
//! stop and join once the front end is gone.
//!
//! Input, repeated: `op` byte, then by op:
//! - 0..=199: a message. `req = op % 48`; then `flags`, `fd kind`, `len`,
//!   and `len` payload bytes. Fd kinds: 0 none, 1 the guest memfd, 2 a
//!   memfd of `len * 4 KiB`, 3 an eventfd, 4 a pipe, 5 two memfds.
//! - 200..=219: write the next 16 bytes at guest offset 16 times the next
//!   two bytes (u16 LE): descriptors, rings, requests.
//! - 220..=229: truncate the guest memfd to `next byte * 4 KiB`.
//! - 230..=255: kick every eventfd sent so far.

use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use thinlun::dev::MemDevice;
use thinlun::{Pool, PoolConfig, Volume};
use thinlun_vhost::{ServeOptions, Server};

const GUEST: u64 = 1 << 20;

struct Fixture {
    _pool: Pool,
    vol: Arc<Volume>,
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dev = Arc::new(MemDevice::new(64 << 20));
        let cfg = PoolConfig {
            size_bytes: Some(64 << 20),
            ..PoolConfig::default()
        };
        let pool = Pool::create(dev, "fuzz", &cfg).expect("pool");
        pool.create_volume("v", 16 << 20).expect("volume");
        let vol = Arc::new(pool.open_volume("v").expect("open"));
        let dir = std::env::temp_dir().join(format!("thinlun-fuzz-vhost-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        Fixture {
            _pool: pool,
            vol,
            dir,
        }
    })
}

fn memfd(len: u64) -> File {
    // SAFETY: a fresh descriptor, owned by the File.
    let f = unsafe { File::from_raw_fd(libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_ALLOW_SEALING)) };
    let _ = f.set_len(len);
    f
}

fn eventfd() -> File {
    // SAFETY: a fresh descriptor, owned by the File.
    unsafe { File::from_raw_fd(libc::eventfd(0, libc::EFD_NONBLOCK)) }
}

fn send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: every pointer in `msg` refers to live locals; at most two
    // descriptors fit the 64-byte control buffer.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let n = (fds.len() * 4) as u32;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(n) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(n) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, fds.len());
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) == bytes.len() as isize
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    static N: AtomicU64 = AtomicU64::new(0);
    let sock_path = fx.dir.join(format!("s{}", N.fetch_add(1, Ordering::Relaxed)));
    let opts = ServeOptions::new(&sock_path, "v");
    let mut server = Server::new(fx.vol.clone(), &opts).expect("server");
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.run());

    let sock = UnixStream::connect(&sock_path).expect("connect");
    // Replies are drained as they come, never waited for: which messages
    // have one depends on what was negotiated.
    sock.set_nonblocking(true).unwrap();
    let guest = memfd(GUEST);
    let mut kicks: Vec<File> = Vec::new();
    let mut keep: Vec<File> = Vec::new();
    let mut at = 0usize;
    let next = |at: &mut usize| -> Option<u8> {
        let b = *data.get(*at)?;
        *at += 1;
        Some(b)
    };
    let mut open = true;
    while open {
        let Some(op) = next(&mut at) else { break };
        match op {
            0..=199 => {
                let req = u32::from(op % 48);
                let (Some(flags), Some(kind), Some(len)) = (next(&mut at), next(&mut at), next(&mut at)) else {
                    break;
                };
                let len = usize::from(len);
                let payload = data.get(at..(at + len).min(data.len())).unwrap_or(&[]).to_vec();
                at += payload.len();
                let mut fds: Vec<RawFd> = Vec::new();
                match kind % 6 {
                    1 => fds.push(guest.as_raw_fd()),
                    2 => {
                        let f = memfd(len as u64 * 4096);
                        fds.push(f.as_raw_fd());
                        keep.push(f);
                    }
                    3 => {
                        let f = eventfd();
                        fds.push(f.as_raw_fd());
                        kicks.push(f);
                    }
                    4 => {
                        let mut p = [0i32; 2];
                        // SAFETY: pipe() fills two descriptors, owned below.
                        unsafe { libc::pipe(p.as_mut_ptr()) };
                        // SAFETY: fresh descriptors from pipe().
                        unsafe {
                            keep.push(File::from_raw_fd(p[0]));
                            keep.push(File::from_raw_fd(p[1]));
                        }
                        fds.push(p[0]);
                    }
                    5 => {
                        fds.push(guest.as_raw_fd());
                        let f = memfd(4096);
                        fds.push(f.as_raw_fd());
                        keep.push(f);
                    }
                    _ => {}
                }
                let mut msg = Vec::with_capacity(12 + payload.len());
                msg.extend_from_slice(&req.to_le_bytes());
                // Version 1 and the input's other flag bits.
                msg.extend_from_slice(&((u32::from(flags) & !0x3) | 0x1).to_le_bytes());
                msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                msg.extend_from_slice(&payload);
                if !send(&sock, &msg, &fds) {
                    open = false;
                }
                let mut buf = [0u8; 4096];
                while matches!((&sock).read(&mut buf), Ok(n) if n > 0) {}
            }
            200..=219 => {
                let (Some(lo), Some(hi)) = (next(&mut at), next(&mut at)) else { break };
                let bytes = data.get(at..(at + 16).min(data.len())).unwrap_or(&[]);
                at += bytes.len();
                use std::os::unix::fs::FileExt;
                let _ = guest.write_at(bytes, u64::from(u16::from_le_bytes([lo, hi])) * 16);
            }
            220..=229 => {
                let Some(pages) = next(&mut at) else { break };
                let _ = guest.set_len(u64::from(pages) * 4096);
            }
            _ => {
                for k in &kicks {
                    let _ = (&*k).write(&1u64.to_le_bytes());
                }
            }
        }
    }
    drop(sock);
    stop.stop();
    let r = thread.join().expect("the server thread panicked");
    r.expect("the server failed");
    let _ = std::fs::remove_file(&sock_path);
});
