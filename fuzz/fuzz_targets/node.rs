#![no_main]
//! node::decode_copy (mapping-tree leaf and interior nodes, single-copy
//! and ditto). A decoded node must re-encode, both copies, to blocks that
//! decode to the same node.

use libfuzzer_sys::fuzz_target;
use thinlun::format::{magic, node};
use thinlun_fuzz::{at, reseal, to_block};

fn check(b: &[u8]) {
    if let Ok(d) = node::decode_copy(b, at::NODE) {
        let volume = u64::from_le_bytes(b[32..40].try_into().unwrap());
        let generation = u64::from_le_bytes(b[24..32].try_into().unwrap());
        // Re-encoded as it was written: one copy, or a ditto node (version
        // 2) naming the same twin.
        let addr = node::NodeAddr {
            block: at::NODE,
            twin: d.twin,
        };
        for (at_block, copy) in node::encode_copies(&d.node, volume, generation, addr) {
            let again = node::decode_copy(&copy, at_block).expect("re-encoded node must decode");
            assert_eq!(again.node, d.node, "node does not survive encode/decode");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(&to_block(data));
    check(&reseal(data, magic::NODE, at::NODE));
});
