#![no_main]
//! Superblock::decode on arbitrary blocks. A decoded superblock must
//! re-encode to a block that decodes to the same value.

use libfuzzer_sys::fuzz_target;
use thinlun::format::{magic, superblock::Superblock};
use thinlun_fuzz::{at, reseal, to_block};

fn check(b: &[u8]) {
    if let Ok(sb) = Superblock::decode(b, at::SUPERBLOCK) {
        let again = Superblock::decode(&sb.encode(at::SUPERBLOCK), at::SUPERBLOCK)
            .expect("re-encoded superblock must decode");
        assert_eq!(again, sb, "superblock does not survive encode/decode");
    }
}

fuzz_target!(|data: &[u8]| {
    check(&to_block(data));
    check(&reseal(data, magic::SUPERBLOCK, at::SUPERBLOCK));
});
