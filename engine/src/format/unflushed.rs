//! The unflushed record (docs/FORMAT.md, 6.11): not on the LUN but in a
//! host's surviving memory. Two slots, each a header and then records of
//! one journal entry each. A slot is the entries that the host's next
//! journal blocks, from sequence `start_seq` on, would carry; the slot with
//! the higher epoch whose header verifies is current.

use super::codec::{get_u32, get_u64, put_u32, put_u64};
use super::journal::{Entry, ENTRY_LEN};
use super::magic;

/// Record version of the slot headers this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of a slot header; the records follow it.
pub const HEADER_LEN: usize = 128;
/// An entry, its position in the slot and a CRC over both and the epoch.
pub const RECORD_LEN: usize = ENTRY_LEN + 8;

/// Whose record a slot is, and from where it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    /// The pool's uuid: memory left by another pool is ignored.
    pub uuid: [u8; 16],
    /// The host whose journal the entries belong to.
    pub host_id: u32,
    /// The boot the record was written on; only that boot may replay it.
    pub boot: u64,
    /// Grows with each rewrite of either slot.
    pub epoch: u64,
    /// Sequence of the journal block that would carry the first entry.
    pub start_seq: u64,
    /// Host checkpoint generations under which the slot is current: equal,
    /// except while a checkpoint moves from the first to the second.
    pub gen_lo: u64,
    /// See `gen_lo`.
    pub gen_hi: u64,
}

/// A slot header's bytes, magic and CRC included.
pub fn encode_header(h: &SlotHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(magic::UNFLUSHED);
    put_u32(&mut b, 8, VERSION);
    put_u32(&mut b, 12, h.host_id);
    b[16..32].copy_from_slice(&h.uuid);
    put_u64(&mut b, 32, h.boot);
    put_u64(&mut b, 40, h.epoch);
    put_u64(&mut b, 48, h.start_seq);
    put_u64(&mut b, 56, h.gen_lo);
    put_u64(&mut b, 64, h.gen_hi);
    let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
    put_u32(&mut b, HEADER_LEN - 4, crc);
    b
}

/// `None` for anything but a whole, current-version header.
pub fn decode_header(b: &[u8]) -> Option<SlotHeader> {
    if b.len() < HEADER_LEN
        || &b[..8] != magic::UNFLUSHED
        || get_u32(b, 8) != VERSION
        || get_u32(b, HEADER_LEN - 4) != crc32fast::hash(&b[..HEADER_LEN - 4])
    {
        return None;
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    let h = SlotHeader {
        uuid,
        host_id: get_u32(b, 12),
        boot: get_u64(b, 32),
        epoch: get_u64(b, 40),
        start_seq: get_u64(b, 48),
        gen_lo: get_u64(b, 56),
        gen_hi: get_u64(b, 64),
    };
    (h.gen_lo <= h.gen_hi).then_some(h)
}

fn record_crc(epoch: u64, index: u32, entry: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&epoch.to_le_bytes());
    c.update(&index.to_le_bytes());
    c.update(entry);
    c.finalize()
}

/// Entry `index` of the slot of `epoch`: the epoch in its CRC makes a
/// record left over from an earlier use of the slot end the slot.
pub fn encode_record(epoch: u64, index: u32, e: &Entry) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    e.encode(&mut b[..ENTRY_LEN]);
    put_u32(&mut b, ENTRY_LEN, index);
    let crc = record_crc(epoch, index, &b[..ENTRY_LEN]);
    put_u32(&mut b, ENTRY_LEN + 4, crc);
    b
}

/// `None` ends the slot: a record never written, torn by the crash, or
/// of another epoch.
pub fn decode_record(epoch: u64, index: u32, b: &[u8]) -> Option<Entry> {
    if b.len() < RECORD_LEN
        || get_u32(b, ENTRY_LEN) != index
        || get_u32(b, ENTRY_LEN + 4) != record_crc(epoch, index, &b[..ENTRY_LEN])
    {
        return None;
    }
    Entry::decode(&b[..ENTRY_LEN])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_records_round_trip_and_reject_damage() {
        let h = SlotHeader {
            uuid: [7; 16],
            host_id: 3,
            boot: 0xb007,
            epoch: 9,
            start_seq: 1234,
            gen_lo: 5,
            gen_hi: 6,
        };
        let mut b = encode_header(&h);
        assert_eq!(decode_header(&b), Some(h));
        b[40] ^= 1;
        assert_eq!(decode_header(&b), None);
        let e = Entry::Map {
            volume: 2,
            vblock: 10,
            pblock: 99,
            len: 4,
        };
        let r = encode_record(9, 17, &e);
        assert_eq!(decode_record(9, 17, &r), Some(e));
        assert_eq!(decode_record(8, 17, &r), None, "another epoch's record");
        assert_eq!(decode_record(9, 18, &r), None, "another position's record");
        let mut torn = r;
        torn[20] ^= 0x40;
        assert_eq!(decode_record(9, 17, &torn), None);
        assert_eq!(decode_record(9, 0, &[0u8; RECORD_LEN]), None);
    }
}
