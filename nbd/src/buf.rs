//! Payload buffers: block-aligned (so the engine's queue takes its fast
//! path, which needs O_DIRECT alignment), resizable within what they hold,
//! and kept for reuse by each connection.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use thinlun::IoBuf;

/// The alignment the engine's fast path asks of a buffer.
const ALIGN: usize = thinlun::BLOCK_SIZE;

/// A heap buffer aligned to [`ALIGN`], `len` bytes of `cap` in use.
pub struct Buf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: a Buf owns its allocation outright, like a Vec<u8>.
unsafe impl Send for Buf {}

impl Buf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Buf {
        let cap = len.max(1).next_multiple_of(ALIGN);
        let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
            // Only for sizes near usize::MAX, which no request has.
            alloc::handle_alloc_error(Layout::new::<u8>());
        };
        // SAFETY: the layout's size is at least ALIGN, not zero.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        Buf { ptr, cap, len }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Uses the first `len` bytes (at most the capacity); what they held
    /// before is left for the caller to overwrite.
    fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout (checked
        // valid there).
        unsafe {
            let layout = Layout::from_size_align_unchecked(self.cap, ALIGN);
            alloc::dealloc(self.ptr.as_ptr(), layout);
        }
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes of our initialised (zeroed at first)
        // allocation, borrowed with `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for Deref, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for Buf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

// SAFETY: the slice is the heap allocation `ptr`, which does not move when
// the Buf does and is never reallocated; its length changes only through
// `set_len`, which needs the Buf itself, and the engine's queue owns the
// Buf while a request is in flight.
unsafe impl IoBuf for Buf {}

/// Payload buffers a connection keeps for reuse, in bytes at most: a
/// fresh buffer costs an allocation, zeroing and page faults.
const SPARE_BYTES: usize = 16 << 20;

/// Buffers of answered requests, for the next ones.
#[derive(Default)]
pub struct Spare {
    bufs: Vec<Buf>,
    bytes: usize,
}

impl Spare {
    /// A buffer of `len` bytes (contents left over from its last use).
    pub fn take(&mut self, len: usize) -> Buf {
        match self.bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.bufs.swap_remove(i);
                self.bytes -= b.capacity();
                b.set_len(len);
                b
            }
            None => Buf::zeroed(len),
        }
    }

    pub fn give(&mut self, b: Buf) {
        if self.bytes + b.capacity() <= SPARE_BYTES {
            self.bytes += b.capacity();
            self.bufs.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        let mut sp = Spare::default();
        let mut b = sp.take(8192);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        b[0] = 7;
        let at = b.as_ptr();
        sp.give(b);
        let b = sp.take(512);
        assert_eq!((b.as_ptr(), b.len(), b.capacity()), (at, 512, 8192));
        assert_eq!(sp.take(0).len(), 0);
    }
}
