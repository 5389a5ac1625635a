//! Replies, encoded into batches that go out in vectored writes: the
//! headers in one byte buffer, read data in the request's own buffer (no
//! copy), possibly partly sent by one thread and finished by another.

use crate::buf::Buf;
use crate::proto::*;
use std::io::IoSlice;
use std::ops::Range;

/// One reply: its header bytes in `Batch::heads`, then its read data.
struct Item {
    head: Range<usize>,
    data: Option<Buf>,
}

/// Replies to send together, in order, and what they free when sent.
pub struct Batch {
    structured: bool,
    heads: Vec<u8>,
    items: Vec<Item>,
    /// Items fully sent, and bytes sent of the next one.
    sent_items: usize,
    sent_bytes: usize,
    /// Payload bytes the replied requests were admitted with (see
    /// `output::Output::admit`).
    pub cost: usize,
}

impl Batch {
    pub fn new(structured: bool) -> Batch {
        Batch {
            structured,
            heads: Vec::with_capacity(256),
            items: Vec::new(),
            sent_items: 0,
            sent_bytes: 0,
            cost: 0,
        }
    }

    /// Replies in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds a reply whose header `f` encodes, followed by `data`.
    fn push(&mut self, cost: usize, data: Option<Buf>, f: impl FnOnce(&mut Vec<u8>)) {
        let at = self.heads.len();
        f(&mut self.heads);
        self.items.push(Item {
            head: at..self.heads.len(),
            data,
        });
        self.cost += cost;
    }

    pub fn ok(&mut self, handle: u64, cost: usize) {
        let structured = self.structured;
        self.push(cost, None, |h| {
            if structured {
                h.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0));
            } else {
                h.extend_from_slice(&simple_reply(handle, 0));
            }
        });
    }

    pub fn err(&mut self, handle: u64, cost: usize, e: NbdError, msg: &str) {
        let structured = self.structured;
        self.push(cost, None, |h| {
            if structured {
                h.extend_from_slice(&error_chunk(handle, e, msg));
            } else {
                h.extend_from_slice(&simple_reply(handle, e as u32));
            }
        });
    }

    /// A read's reply, with the data in `buf`.
    pub fn data(&mut self, handle: u64, cost: usize, offset: u64, buf: Buf) {
        let structured = self.structured;
        let len = buf.len();
        self.push(cost, Some(buf), |h| {
            if structured {
                let kind = REPLY_TYPE_OFFSET_DATA;
                // Payloads are at most MAX_PAYLOAD: the length fits.
                h.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, kind, handle, 8 + len as u32));
                h.extend_from_slice(&offset.to_be_bytes());
            } else {
                h.extend_from_slice(&simple_reply(handle, 0));
            }
        });
    }

    /// A final chunk of `kind` with a small payload (copied).
    pub fn chunk(&mut self, handle: u64, cost: usize, kind: u16, payload: &[u8]) {
        self.push(cost, None, |h| {
            h.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                kind,
                handle,
                payload.len() as u32,
            ));
            h.extend_from_slice(payload);
        });
    }

    /// The unsent bytes as slices, at most `max` of them.
    pub fn slices<'a>(&'a self, max: usize, out: &mut Vec<IoSlice<'a>>) {
        let mut skip = self.sent_bytes;
        for it in &self.items[self.sent_items..] {
            for part in [
                &self.heads[it.head.clone()],
                it.data.as_deref().unwrap_or(&[]),
            ] {
                if out.len() >= max {
                    return;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                out.push(IoSlice::new(&part[skip..]));
                skip = 0;
            }
        }
    }

    /// Records `n` more bytes as sent; returns the buffers of the replies
    /// now fully sent, for reuse.
    pub fn advance(&mut self, mut n: usize, freed: &mut Vec<Buf>) {
        while let Some(it) = self.items.get_mut(self.sent_items) {
            let total = it.head.len() + it.data.as_ref().map_or(0, |d| d.len());
            let left = total - self.sent_bytes;
            if n < left {
                self.sent_bytes += n;
                return;
            }
            n -= left;
            self.sent_bytes = 0;
            self.sent_items += 1;
            freed.extend(it.data.take());
        }
    }

    pub fn done(&self) -> bool {
        self.sent_items == self.items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsent(b: &Batch) -> Vec<u8> {
        let mut s = Vec::new();
        b.slices(usize::MAX, &mut s);
        s.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn a_batch_resumes_where_a_send_stopped() {
        let mut b = Batch::new(false);
        let mut d = Buf::zeroed(4096);
        d.fill(9);
        b.ok(1, 0);
        b.data(2, 4096, 0, d);
        b.err(3, 0, NbdError::Inval, "x");
        let all = unsent(&b);
        assert_eq!(all.len(), 16 + 16 + 4096 + 16);
        assert_eq!((b.len(), b.cost), (3, 4096));
        let mut freed = Vec::new();
        for step in [5, 11, 100, 4000] {
            let before = unsent(&b);
            b.advance(step, &mut freed);
            assert_eq!(unsent(&b), before[step..]);
        }
        assert!(freed.is_empty() && !b.done());
        b.advance(all.len() - 4116, &mut freed);
        assert_eq!((freed.len(), b.done()), (1, true));
        assert!(unsent(&b).is_empty());
    }
}
