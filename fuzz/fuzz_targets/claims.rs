#![no_main]
//! claims::decode (allocation-group claim table). Decoded claims must
//! survive encode/decode.

use libfuzzer_sys::fuzz_target;
use thinlun::format::{claims, magic};
use thinlun_fuzz::{at, reseal, to_block};

fn check(b: &[u8]) {
    if let Ok(c) = claims::decode(b, at::CLAIMS, at::MAX_HOSTS) {
        assert_eq!(c.len(), claims::CLAIMS_PER_BLOCK);
        assert!(c.iter().all(|c| u32::from(c.owner) <= at::MAX_HOSTS));
        let again = claims::decode(
            &claims::encode(&c, 1, at::CLAIMS),
            at::CLAIMS,
            at::MAX_HOSTS,
        )
        .expect("re-encoded claim table must decode");
        assert_eq!(again, c, "claim table does not survive encode/decode");
    }
}

fuzz_target!(|data: &[u8]| {
    check(&to_block(data));
    check(&reseal(data, magic::AG_TABLE, at::CLAIMS));
});
