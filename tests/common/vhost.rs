//! A vhost-user-blk client without a VM (virtio-driver), with raw control
//! over descriptor chains, and the data checks the vhost tests share.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
use virtio_driver::{
    iovec, ByteValued, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioFeatureFlags,
    VirtioTransport,
};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Status value the server never writes: "not answered".
pub const UNTOUCHED: u8 = 0xee;
pub const QUEUE_SIZE: u16 = 128;
pub const DATA_MEM: usize = 8 << 20;

/// Per-request memory shared with the device: header, discard/write-zeroes
/// ranges or the GET_ID answer, and the status byte.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct RawReq {
    pub header: [u8; 16],
    pub extra: [u8; 64],
    pub status: u8,
}

// SAFETY: plain bytes, any bit pattern is valid.
unsafe impl ByteValued for RawReq {}

pub type Transport = dyn VirtioTransport<VirtioBlkConfig, RawReq>;

/// A scratch directory, removed on drop.
pub fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("thinlun-vhost-{tag}-"))
        .tempdir()
        .unwrap()
}

/// Shared memory for data buffers, registered with the device.
pub struct DataMem {
    ptr: *mut u8,
    len: usize,
    _file: File,
}

impl DataMem {
    pub fn new(len: usize) -> DataMem {
        // SAFETY: a fresh memfd, sized and mapped shared; the mapping lives
        // as long as DataMem.
        unsafe {
            let fd = libc::memfd_create(c"thinlun-test-data".as_ptr(), 0);
            assert!(fd >= 0);
            let file = File::from_raw_fd(fd);
            file.set_len(len as u64).unwrap();
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            DataMem {
                ptr: ptr as *mut u8,
                len,
                _file: file,
            }
        }
    }

    #[allow(clippy::mut_from_ref)]
    pub fn slice(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: within the mapping; tests use disjoint ranges per request.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for DataMem {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// One piece of a request's descriptor chain.
#[derive(Clone, Copy)]
pub enum Part {
    /// The 16-byte header, or only its first n bytes.
    Header(usize),
    /// n bytes of `extra`, device-readable or device-writable.
    Extra(usize, bool),
    /// Data buffer at (offset, len) of the data memory.
    Data(usize, usize, bool),
    Status,
}

pub struct Client {
    // Queues borrow the transport's queue memory: dropped first.
    pub queues: Vec<Virtqueue<'static, RawReq>>,
    pub transport: Box<Transport>,
    pub mem: DataMem,
}

impl Client {
    pub fn connect(sock: &Path, nq: usize) -> Client {
        let wanted = VirtioFeatureFlags::VERSION_1.bits()
            | VirtioFeatureFlags::RING_EVENT_IDX.bits()
            | VirtioFeatureFlags::RING_INDIRECT_DESC.bits()
            | VirtioBlkFeatureFlags::all().bits();
        let vu = VhostUser::<VirtioBlkConfig, RawReq>::new(sock.to_str().unwrap(), wanted).unwrap();
        let mut transport: Box<Transport> = Box::new(vu);
        let feats = VirtioFeatureFlags::from_bits_truncate(transport.get_features());
        let layout = VirtqueueLayout::new::<RawReq>(nq, QUEUE_SIZE as usize, feats).unwrap();
        let translators: Vec<_> = (0..nq).map(|_| transport.iova_translator()).collect();
        let qmem = transport.alloc_queue_mem(&layout).unwrap();
        let base = qmem.as_mut_ptr();
        let queues: Vec<Virtqueue<'static, RawReq>> = translators
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                // SAFETY: disjoint parts of the transport's queue memory,
                // which lives (in `transport`) longer than the queues.
                let part = unsafe {
                    std::slice::from_raw_parts_mut(
                        base.add(i * layout.end_offset),
                        layout.end_offset,
                    )
                };
                Virtqueue::new(t, part, QUEUE_SIZE, feats).unwrap()
            })
            .collect();
        // The data region first, as QEMU maps all memory before it starts
        // the rings: ADD_MEM_REG gets no reply, so mapped after the rings
        // it could reach the server after the first kick, which then finds
        // the request's buffers nowhere and fails it.
        let mem = DataMem::new(DATA_MEM);
        transport
            .map_mem_region(mem.ptr as usize, mem.len, mem._file.as_raw_fd(), 0)
            .unwrap();
        transport.setup_queues(&queues).unwrap();
        let mut queues = queues;
        for q in queues.iter_mut() {
            // Keep used_event current so the server signals completions.
            q.set_used_notif_enabled(true);
        }
        Client {
            queues,
            transport,
            mem,
        }
    }

    pub fn features(&self) -> u64 {
        self.transport.get_features()
    }

    pub fn config(&self) -> Vec<u8> {
        let c = self.transport.get_config().unwrap();
        c.as_slice().to_vec()
    }

    /// Queues one request; returns its chain id.
    pub fn add(&mut self, q: usize, rtype: u32, sector: u64, extra: &[u8], parts: &[Part]) -> u16 {
        let mem = &self.mem;
        self.queues[q]
            .add_request(|req, add_desc| {
                req.header = [0; 16];
                req.header[..4].copy_from_slice(&rtype.to_le_bytes());
                req.header[8..].copy_from_slice(&sector.to_le_bytes());
                req.extra = [0; 64];
                req.extra[..extra.len()].copy_from_slice(extra);
                req.status = UNTOUCHED;
                for p in parts {
                    let (base, len, write): (*mut u8, usize, bool) = match *p {
                        Part::Header(n) => (req.header.as_mut_ptr(), n, false),
                        Part::Extra(n, w) => (req.extra.as_mut_ptr(), n, w),
                        Part::Data(off, len, w) => (mem.slice(off, len).as_mut_ptr(), len, w),
                        Part::Status => (&mut req.status as *mut u8, 1, true),
                    };
                    add_desc(
                        iovec {
                            iov_base: base as *mut libc::c_void,
                            iov_len: len,
                        },
                        write,
                    )?;
                }
                Ok(())
            })
            .unwrap()
    }

    /// Kicks queue `q` and waits for the given chains; returns (id, request
    /// memory) in completion order.
    pub fn run(&mut self, q: usize, ids: &[u16]) -> Vec<(u16, RawReq)> {
        self.kick(q);
        let mut done = Vec::new();
        while done.len() < ids.len() {
            done.extend(self.wait_any(q));
        }
        done
    }

    /// Tells the server that queue `q` has new chains.
    pub fn kick(&mut self, q: usize) {
        self.transport.get_submission_notifier(q).notify().unwrap();
    }

    /// Waits until queue `q` has completions; returns them (id, request
    /// memory) in completion order.
    pub fn wait_any(&mut self, q: usize) -> Vec<(u16, RawReq)> {
        let fd = self.transport.get_completion_fd(q);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done: Vec<(u16, RawReq)> = self.queues[q]
                .completions()
                .map(|c| (c.id, c.req))
                .collect();
            if !done.is_empty() {
                return done;
            }
            assert!(Instant::now() < deadline, "requests not completed in time");
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
                let _ = fd.read();
            }
        }
    }

    /// One request, run alone; returns its status byte.
    pub fn one(&mut self, rtype: u32, sector: u64, extra: &[u8], parts: &[Part]) -> u8 {
        let id = self.add(0, rtype, sector, extra, parts);
        let done = self.run(0, &[id]);
        assert_eq!(done[0].0, id);
        done[0].1.status
    }

    pub fn write(&mut self, sector: u64, off: usize, len: usize) -> u8 {
        self.one(
            T_OUT,
            sector,
            &[],
            &[Part::Header(16), Part::Data(off, len, false), Part::Status],
        )
    }

    pub fn read(&mut self, sector: u64, off: usize, len: usize) -> u8 {
        self.one(
            T_IN,
            sector,
            &[],
            &[Part::Header(16), Part::Data(off, len, true), Part::Status],
        )
    }

    pub fn ranges(&mut self, rtype: u32, ranges: &[(u64, u32, u32)]) -> u8 {
        let mut extra = Vec::new();
        for &(sector, n, flags) in ranges {
            extra.extend_from_slice(&sector.to_le_bytes());
            extra.extend_from_slice(&n.to_le_bytes());
            extra.extend_from_slice(&flags.to_le_bytes());
        }
        let len = extra.len();
        self.one(
            rtype,
            0,
            &extra,
            &[Part::Header(16), Part::Extra(len, false), Part::Status],
        )
    }

    pub fn data(&self, off: usize, len: usize) -> &mut [u8] {
        self.mem.slice(off, len)
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Compares without printing megabytes on failure.
#[track_caller]
pub fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:#x}, want {:#x}",
            i / 512,
            got[i],
            want[i]
        );
    }
}

#[track_caller]
pub fn zeros(got: &[u8], what: &str) {
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!(
            "{what}: byte {i} (sector {}) is {:#x}, not zero",
            i / 512,
            got[i]
        );
    }
}

pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
