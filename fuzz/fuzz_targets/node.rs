#![no_main]
//! node::decode (mapping-tree leaf and interior nodes). A decoded node must
//! re-encode to a block that decodes to the same node.

use libfuzzer_sys::fuzz_target;
use thinlun::format::{magic, node};
use thinlun_fuzz::{at, reseal, to_block};

fn check(b: &[u8]) {
    if let Ok(n) = node::decode(b, at::NODE) {
        let volume = u64::from_le_bytes(b[32..40].try_into().unwrap());
        let generation = u64::from_le_bytes(b[24..32].try_into().unwrap());
        let again = node::decode(&node::encode(&n, volume, generation, at::NODE), at::NODE)
            .expect("re-encoded node must decode");
        assert_eq!(again, n, "node does not survive encode/decode");
    }
}

fuzz_target!(|data: &[u8]| {
    check(&to_block(data));
    check(&reseal(data, magic::NODE, at::NODE));
});
