#![no_main]
//! thinlun_vhost::request::parse (virtio-blk descriptor chains). Any chain,
//! limits and guest memory must give a result, never a panic; what parses
//! as a command must honour the limits it was parsed under.

use libfuzzer_sys::fuzz_target;
use thinlun_fuzz::virtio;
use thinlun_vhost::request::{parse, Command, Range, SECTOR};

fn check_ranges(ranges: &[Range], max_sectors: u32, max_seg: u32, capacity: u64, zero: bool) {
    assert!(!ranges.is_empty() && ranges.len() as u64 <= max_seg as u64);
    for r in ranges {
        assert!(r.sectors <= max_sectors);
        assert!(r
            .sector
            .checked_add(r.sectors as u64)
            .is_some_and(|e| e <= capacity));
        assert!(zero || !r.unmap, "discard ranges never carry UNMAP");
    }
}

fuzz_target!(|data: &[u8]| {
    let input = virtio::decode(data);
    let lim = input.limits;
    let result = parse(&input.descs, &input.mem, &lim);
    // Pure: the same chain parses the same way.
    assert_eq!(result, parse(&input.descs, &input.mem, &lim));
    let Ok(parsed) = result else { return };
    // The status byte is the last byte of a device-writable descriptor.
    assert!(input.descs.iter().any(|d| d.write
        && d.len > 0
        && d.addr.checked_add(d.len as u64 - 1) == Some(parsed.status_addr)));
    match parsed.cmd {
        Ok(Command::Read { sector, segs }) | Ok(Command::Write { sector, segs }) => {
            let len: u64 = segs.iter().map(|s| s.len as u64).sum();
            assert!(len.is_multiple_of(SECTOR) && len <= lim.max_transfer);
            assert!(sector
                .checked_add(len / SECTOR)
                .is_some_and(|e| e <= lim.capacity));
            assert!(segs.iter().all(|s| s.len > 0));
        }
        Ok(Command::Discard { ranges }) => check_ranges(
            &ranges,
            lim.max_discard_sectors,
            lim.max_discard_seg,
            lim.capacity,
            false,
        ),
        Ok(Command::WriteZeroes { ranges }) => check_ranges(
            &ranges,
            lim.max_write_zeroes_sectors,
            lim.max_write_zeroes_seg,
            lim.capacity,
            true,
        ),
        Ok(Command::GetId { segs }) => assert!(!segs.is_empty()),
        Ok(Command::Flush) | Err(_) => {}
    }
});
