#![no_main]
//! HostSlot::decode and LockRegister::decode (the lease sectors of a shared
//! pool). Decoded records must survive encode/decode.

use libfuzzer_sys::fuzz_target;
use thinlun::format::lease::{HostSlot, LockRegister};
use thinlun::format::magic;
use thinlun_fuzz::{at, reseal, to_block};

fn check(b: &[u8]) {
    if let Ok(Some(s)) = HostSlot::decode(b, at::HOST_SLOT, 1) {
        let again = HostSlot::decode(&s.encode(at::HOST_SLOT), at::HOST_SLOT, 1)
            .expect("re-encoded host slot must decode");
        assert_eq!(again, Some(s), "host slot does not survive encode/decode");
    }
    if let Ok(Some(r)) = LockRegister::decode(b, at::LOCK_REGISTER, 1) {
        let again = LockRegister::decode(&r.encode(at::LOCK_REGISTER), at::LOCK_REGISTER, 1)
            .expect("re-encoded lock register must decode");
        assert_eq!(
            again,
            Some(r),
            "lock register does not survive encode/decode"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(&to_block(data));
    check(&reseal(data, magic::HOST_SLOT, at::HOST_SLOT));
    check(&reseal(data, magic::LOCK_REGISTER, at::LOCK_REGISTER));
});
