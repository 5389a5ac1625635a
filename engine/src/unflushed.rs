//! The unflushed record (docs/FORMAT.md, 6.11): the mapping changes of
//! completed writes that no commit has journaled yet, kept in surviving
//! memory (a file on tmpfs) instead of written to the LUN. Each change is
//! stored there when the write that made it completes, before the write is
//! answered, so a crash of the process loses no completed write, at the
//! cost of a memory copy instead of a journal-block write per request.
//!
//! The record mirrors `State::pending`: a slot holds exactly the entries
//! that the journal blocks from `start_seq` on would carry, in order. A
//! commit rewrites the other slot with what is still pending once its own
//! journal blocks are durable, so either slot is always a complete account
//! of what the LUN lacks.

use crate::dev::{MappedFile, MemCopy, SurvivingMemory};
use crate::format::journal::Entry;
use crate::format::unflushed::{
    decode_header, decode_record, encode_header, encode_record, SlotHeader, HEADER_LEN, RECORD_LEN,
};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

/// Where a writer keeps the mapping changes that no commit has journaled
/// yet, so that [`Volume::persist`](crate::Volume::persist) costs no device
/// write (docs/FORMAT.md, 6.11).
#[derive(Clone, Default)]
pub enum UnflushedPlace {
    /// A file per pool and host in the run directory (/run/thinlun, which
    /// is tmpfs; or $THINLUN_RUN_DIR): `<pool uuid>-host<N>.unflushed`.
    /// Without one, persists write journal blocks.
    #[default]
    RunDir,
    /// None: each persist writes a journal block instead.
    Off,
    /// This memory (tests of crash points).
    In(std::sync::Arc<dyn crate::dev::SurvivingMemory>),
}

impl std::fmt::Debug for UnflushedPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnflushedPlace::RunDir => "RunDir",
            UnflushedPlace::Off => "Off",
            UnflushedPlace::In(_) => "In(..)",
        })
    }
}

/// Entries a slot holds: more than a second of first writes at 64K IOPS
/// between two commits. A slot that fills makes writes wait for a commit.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// Bytes of surviving memory a record of `capacity` entries per slot needs.
pub fn bytes_for(capacity: usize) -> usize {
    2 * slot_len(capacity)
}

fn slot_len(capacity: usize) -> usize {
    HEADER_LEN + capacity * RECORD_LEN
}

/// The memory a pool opened as `owner` keeps its record in, if any. A
/// read-only open gets a copy of what an earlier writer left, and writes
/// nothing.
pub(crate) fn memory(
    place: &UnflushedPlace,
    owner: Owner,
    read_only: bool,
) -> Option<Arc<dyn SurvivingMemory>> {
    if owner.host_id == 0 || owner.boot == 0 {
        // No journal to complete, or no way to tell this boot's record.
        return None;
    }
    match place {
        UnflushedPlace::Off => None,
        UnflushedPlace::In(m) => Some(m.clone()),
        UnflushedPlace::RunDir => {
            let dir = crate::util::run_dir();
            let path = path_in_run_dir(&owner.uuid, owner.host_id);
            if read_only {
                let bytes = MappedFile::read_existing(&path)?;
                return Some(Arc::new(MemCopy::new(bytes)));
            }
            let made = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .and_then(|_| MappedFile::open(&path, bytes_for(DEFAULT_CAPACITY)));
            match made {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    log::warn!(
                        "no unflushed record at {} ({e}): each persist writes a journal block instead",
                        path.display()
                    );
                    None
                }
            }
        }
    }
}

/// The file of a pool's host's record under [`UnflushedPlace::RunDir`].
pub(crate) fn path_in_run_dir(uuid: &[u8; 16], host_id: u32) -> std::path::PathBuf {
    let name = format!(
        "{}-host{host_id}.unflushed",
        crate::format::format_uuid(uuid)
    );
    crate::util::run_dir().join(name)
}

/// Whose record: a pool, one of its hosts, one boot of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uuid: [u8; 16],
    pub host_id: u32,
    pub boot: u64,
}

pub(crate) struct UnflushedRecord {
    mem: Arc<dyn SurvivingMemory>,
    owner: Owner,
    capacity: usize,
    slot: usize,
    epoch: u64,
    count: usize,
    /// Entries were queued that the slot had no room for: they survive only
    /// once a commit journals them.
    overflowed: bool,
}

impl UnflushedRecord {
    /// Starts writing the record in `mem` (which may hold an earlier
    /// process's record: `after` is the highest epoch found there and its
    /// slot, which stays untouched until the new slot is complete), with
    /// `pending` as its first entries.
    pub fn start(
        mem: Arc<dyn SurvivingMemory>,
        owner: Owner,
        after: (u64, usize),
        key: RecordKey,
        pending: &[Entry],
    ) -> Option<UnflushedRecord> {
        let capacity = (mem.len() / 2).checked_sub(HEADER_LEN)? / RECORD_LEN;
        if capacity == 0 {
            return None;
        }
        let mut r = UnflushedRecord {
            mem,
            owner,
            capacity,
            slot: after.1,
            epoch: after.0,
            count: 0,
            overflowed: false,
        };
        r.reset(key, pending);
        Some(r)
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Records entries just queued for the journal.
    pub fn append(&mut self, entries: &[Entry]) {
        let room = self.capacity - self.count;
        if entries.len() > room {
            self.overflowed = true;
        }
        let take = entries.len().min(room);
        if take == 0 {
            return;
        }
        let bytes = self.records_for(self.epoch, self.count, &entries[..take]);
        let at = self.slot * slot_len(self.capacity) + HEADER_LEN + self.count * RECORD_LEN;
        self.mem.store(at, &bytes);
        self.count += take;
    }

    /// Starts over in the other slot with what is still `pending`: the
    /// entries before it are durable on the LUN now, under `key`. The
    /// header goes last, so until it is complete the old slot stays
    /// current.
    pub fn reset(&mut self, key: RecordKey, pending: &[Entry]) {
        let slot = 1 - self.slot;
        let epoch = self.epoch + 1;
        let take = pending.len().min(self.capacity);
        let base = slot * slot_len(self.capacity);
        self.epoch = epoch;
        let bytes = self.records_for(epoch, 0, &pending[..take]);
        // An empty slot still needs its first record to end it: a record
        // left from an earlier epoch fails its CRC, so nothing to clear.
        self.mem.store(base + HEADER_LEN, &bytes);
        let h = SlotHeader {
            uuid: self.owner.uuid,
            host_id: self.owner.host_id,
            boot: self.owner.boot,
            epoch,
            start_seq: key.start_seq,
            gen_lo: key.gen_lo,
            gen_hi: key.gen_hi,
        };
        self.mem.store(base, &encode_header(&h));
        self.slot = slot;
        self.count = take;
        self.overflowed = pending.len() > take;
    }

    /// The pool closed cleanly: nothing is unflushed.
    pub fn release(&self) {
        self.mem.release();
    }

    fn records_for(&self, epoch: u64, first: usize, entries: &[Entry]) -> Vec<u8> {
        let mut b = Vec::with_capacity(entries.len() * RECORD_LEN);
        for (i, e) in entries.iter().enumerate() {
            b.extend_from_slice(&encode_record(epoch, (first + i) as u32, e));
        }
        b
    }
}

/// Where a slot stands against the journal: see [`SlotHeader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordKey {
    pub start_seq: u64,
    pub gen_lo: u64,
    pub gen_hi: u64,
}

impl RecordKey {
    pub fn at(start_seq: u64, generation: u64) -> RecordKey {
        RecordKey {
            start_seq,
            gen_lo: generation,
            gen_hi: generation,
        }
    }
}

/// What a record holds for its owner.
pub(crate) struct Found {
    pub key: RecordKey,
    pub entries: Vec<Entry>,
}

/// Reads the current slot of `owner`'s record, and the highest epoch of
/// any slot with that slot's index (a new writer continues above it, in
/// the other slot).
pub(crate) fn read(mem: &dyn SurvivingMemory, owner: Owner) -> (Option<Found>, (u64, usize)) {
    let len = mem.len();
    let Some(capacity) = (len / 2).checked_sub(HEADER_LEN).map(|n| n / RECORD_LEN) else {
        return (None, (0, 1));
    };
    let mut best: Option<(usize, SlotHeader)> = None;
    let mut top = (0, 1);
    for slot in 0..2 {
        let mut b = [0u8; HEADER_LEN];
        mem.load(slot * slot_len(capacity), &mut b);
        let Some(h) = decode_header(&b) else { continue };
        if h.epoch >= top.0 {
            top = (h.epoch, slot);
        }
        let mine = h.uuid == owner.uuid
            && h.host_id == owner.host_id
            && h.boot == owner.boot
            && h.boot != 0;
        if mine && best.is_none_or(|(_, b)| h.epoch > b.epoch) {
            best = Some((slot, h));
        }
    }
    let Some((slot, h)) = best else {
        return (None, top);
    };
    let mut entries = Vec::new();
    let mut rec = [0u8; RECORD_LEN];
    let base = slot * slot_len(capacity) + HEADER_LEN;
    for i in 0..capacity {
        mem.load(base + i * RECORD_LEN, &mut rec);
        match decode_record(h.epoch, i as u32, &rec) {
            Some(e) => entries.push(e),
            None => break,
        }
    }
    let key = RecordKey {
        start_seq: h.start_seq,
        gen_lo: h.gen_lo,
        gen_hi: h.gen_hi,
    };
    (Some(Found { key, entries }), top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemCopy;

    fn map(vblock: u64) -> Entry {
        Entry::Map {
            volume: 1,
            vblock,
            pblock: 500 + vblock,
            len: 1,
        }
    }

    const OWNER: Owner = Owner {
        uuid: [3; 16],
        host_id: 1,
        boot: 77,
    };

    #[test]
    fn a_reset_keeps_what_is_still_pending_and_a_slot_can_overflow() {
        let mem = Arc::new(MemCopy::new(vec![0u8; bytes_for(4)]));
        let mut r =
            UnflushedRecord::start(mem.clone(), OWNER, (0, 1), RecordKey::at(10, 2), &[]).unwrap();
        r.append(&[map(1), map(2)]);
        let (found, _) = read(mem.as_ref(), OWNER);
        let found = found.unwrap();
        assert_eq!(found.key, RecordKey::at(10, 2));
        assert_eq!(found.entries, vec![map(1), map(2)]);
        // A commit journaled 1 and 2 while 3 arrived.
        r.append(&[map(3)]);
        r.reset(RecordKey::at(11, 2), &[map(3)]);
        let (found, top) = read(mem.as_ref(), OWNER);
        assert_eq!(found.unwrap().entries, vec![map(3)]);
        assert_eq!(top, (2, 1));
        r.append(&[map(4), map(5), map(6)]);
        assert!(!r.overflowed());
        r.append(&[map(7)]);
        assert!(r.overflowed(), "the fifth entry has no room");
        // Another boot, host or pool finds nothing.
        for other in [
            Owner { boot: 78, ..OWNER },
            Owner {
                host_id: 2,
                ..OWNER
            },
            Owner {
                uuid: [4; 16],
                ..OWNER
            },
        ] {
            assert!(read(mem.as_ref(), other).0.is_none());
        }
    }

    #[test]
    fn a_reset_torn_before_its_header_leaves_the_old_slot_current() {
        let mem = Arc::new(MemCopy::new(vec![0u8; bytes_for(8)]));
        let mut r =
            UnflushedRecord::start(mem.clone(), OWNER, (0, 1), RecordKey::at(1, 1), &[]).unwrap();
        r.append(&[map(1)]);
        // The next reset's records, without its header.
        let other = slot_len(8) * (1 - r.slot) + HEADER_LEN;
        mem.store(other, &encode_record(r.epoch + 1, 0, &map(9)));
        let found = read(mem.as_ref(), OWNER).0.unwrap();
        assert_eq!(found.entries, vec![map(1)]);
    }
}
