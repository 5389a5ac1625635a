#![no_main]
//! DiffReader (the export-diff / import-diff stream): any byte string is a
//! clear error or a sequence of records within the announced volume size,
//! never a panic, and a record never claims more data than the input held.

use libfuzzer_sys::fuzz_target;
use thinlun::diffstream::{DiffReader, Record};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let Ok(mut r) = DiffReader::new(&mut input) else {
        return;
    };
    let size = r.header().size_bytes;
    let mut carried = 0usize;
    // Each record consumes input, so this ends; the bound is a safeguard.
    for _ in 0..data.len() + 2 {
        match r.next_record() {
            Ok(Record::Data { offset, data: d }) => {
                carried += d.len();
                assert!(carried <= data.len(), "records carry more than the input");
                assert!(offset + d.len() as u64 <= size, "data past the volume end");
            }
            Ok(Record::Zero { offset, len }) => {
                assert!(offset.checked_add(len).is_some_and(|e| e <= size));
            }
            Ok(Record::End { .. }) | Err(_) => return,
        }
    }
});
