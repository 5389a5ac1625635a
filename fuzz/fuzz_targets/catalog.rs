#![no_main]
//! decode_catalog (with the layout of a default 1 GiB pool) and
//! decode_volume_header. Decoded values must survive encode/decode.

use libfuzzer_sys::fuzz_target;
use thinlun::format::catalog::{
    decode_catalog, decode_volume_header, encode_catalog, encode_volume_header,
};
use thinlun::format::{magic, Layout};
use thinlun_fuzz::{at, layout, reseal, to_block};

fn catalog(b: &[u8], l: &Layout) {
    if let Ok(cb) = decode_catalog(b, l, at::CATALOG) {
        let generation = u64::from_le_bytes(b[24..32].try_into().unwrap());
        let again = decode_catalog(
            &encode_catalog(&cb, generation, at::CATALOG),
            l,
            at::CATALOG,
        )
        .expect("re-encoded catalog block must decode");
        assert_eq!(again, cb, "catalog block does not survive encode/decode");
    }
}

fn volume_header(b: &[u8]) {
    if let Ok(h) = decode_volume_header(b, at::VOLUME_HEADER) {
        let again = decode_volume_header(
            &encode_volume_header(&h, at::VOLUME_HEADER),
            at::VOLUME_HEADER,
        )
        .expect("re-encoded volume header must decode");
        assert_eq!(again, h, "volume header does not survive encode/decode");
    }
}

fuzz_target!(|data: &[u8]| {
    let l = layout();
    let raw = to_block(data);
    catalog(&raw, &l);
    volume_header(&raw);
    catalog(&reseal(data, magic::CATALOG, at::CATALOG), &l);
    volume_header(&reseal(data, magic::VOLUME_HEADER, at::VOLUME_HEADER));
});
