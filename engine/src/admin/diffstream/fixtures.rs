//! What the tests of `wire`, `export`, `import` and the round trip share:
//! pools with known content, and a stream decoded into a list of records.

use super::{export_diff, DiffHeader, DiffReader, Record};
use crate::dev::MemDevice;
use crate::error::Result;
use crate::format::BLOCK_SIZE;
use crate::{Pool, PoolConfig};
use std::sync::Arc;

pub(super) const MIB: u64 = 1 << 20;
pub(super) const BS: usize = BLOCK_SIZE;

pub(super) fn new_pool() -> Pool {
    let cfg = PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts: 1,
        ..PoolConfig::default()
    };
    Pool::create(Arc::new(MemDevice::new(64 * MIB)), "mem", &cfg).unwrap()
}

pub(super) fn write(pool: &Pool, vol: &str, block: u64, tag: u8, blocks: usize) {
    let v = pool.open_volume(vol).unwrap();
    v.write(block * 8, &vec![tag; blocks * BS]).unwrap();
}

pub(super) fn content(pool: &Pool, vol: &str) -> Vec<u8> {
    let v = pool.open_volume(vol).unwrap();
    let mut buf = vec![0u8; v.size_bytes() as usize];
    v.read(0, &mut buf).unwrap();
    buf
}

pub(super) fn names(pool: &Pool) -> Vec<String> {
    pool.volumes().into_iter().map(|v| v.name).collect()
}

pub(super) fn export(pool: &Pool, from: Option<&str>, to: &str) -> Vec<u8> {
    let mut out = Vec::new();
    export_diff(pool, from, to, &mut out).unwrap();
    out
}

/// Source pool with vm@s1 and vm@s2 (changes, a discard, a grow).
pub(super) fn source() -> Pool {
    let p = new_pool();
    p.create_volume("vm", 2 * MIB).unwrap();
    write(&p, "vm", 0, 1, 4);
    write(&p, "vm", 100, 2, 20);
    write(&p, "vm", 300, 3, 1);
    p.create_snapshot("vm@s1").unwrap();
    write(&p, "vm", 2, 4, 1);
    let v = p.open_volume("vm").unwrap();
    v.write_zeroes(105 * 8, 10 * 8).unwrap();
    v.write(301 * 8 + 3, &[9u8; 512]).unwrap();
    drop(v);
    p.resize_volume("vm", 3 * MIB, false).unwrap();
    write(&p, "vm", 700, 5, 2);
    p.create_snapshot("vm@s2").unwrap();
    p
}

/// [`source`], its full stream up to vm@s1 and its incremental stream
/// from vm@s1 to vm@s2.
pub(super) fn source_and_streams() -> (Pool, Vec<u8>, Vec<u8>) {
    let src = source();
    let full = export(&src, None, "vm@s1");
    let incr = export(&src, Some("s1"), "vm@s2");
    (src, full, incr)
}

/// A record as (b'd' or b'z', offset, length).
pub(super) type Rec = (u8, u64, u64);

pub(super) fn decode_all(bytes: &[u8]) -> Result<(DiffHeader, Vec<Rec>)> {
    let mut input = bytes;
    let mut r = DiffReader::new(&mut input)?;
    let h = r.header().clone();
    let mut recs = Vec::new();
    loop {
        match r.next_record()? {
            Record::Data { offset, data } => recs.push((b'd', offset, data.len() as u64)),
            Record::Zero { offset, len } => recs.push((b'z', offset, len)),
            Record::End { records } => {
                assert_eq!(records as usize, recs.len());
                return Ok((h, recs));
            }
        }
    }
}
