#![no_main]
//! journal::decode_block and decode_host_checkpoint. Decoded values must
//! survive encode/decode; a journal block's returned CRC must be the CRC
//! stored in the block.

use libfuzzer_sys::fuzz_target;
use thinlun::format::journal::{
    decode_block, decode_host_checkpoint, encode_block, encode_host_checkpoint,
};
use thinlun::format::magic;
use thinlun_fuzz::{at, reseal, to_block};

fn journal_block(b: &[u8]) {
    if let Ok(Some((jb, crc))) = decode_block(b, at::JOURNAL) {
        assert_eq!(
            crc.to_le_bytes(),
            b[12..16],
            "returned CRC is not the stored one"
        );
        let (enc, enc_crc) = encode_block(&jb, at::JOURNAL);
        let (again, again_crc) = decode_block(&enc, at::JOURNAL)
            .expect("re-encoded journal block must decode")
            .expect("re-encoded journal block must be valid");
        assert_eq!(again, jb, "journal block does not survive encode/decode");
        assert_eq!(again_crc, enc_crc);
    }
}

fn host_checkpoint(b: &[u8]) {
    if let Ok(h) = decode_host_checkpoint(b, at::HOST_CHECKPOINT, at::RING_LEN) {
        assert!(h.head < at::RING_LEN);
        let again = decode_host_checkpoint(
            &encode_host_checkpoint(&h, at::HOST_CHECKPOINT),
            at::HOST_CHECKPOINT,
            at::RING_LEN,
        )
        .expect("re-encoded host checkpoint must decode");
        assert_eq!(again, h, "host checkpoint does not survive encode/decode");
    }
}

fuzz_target!(|data: &[u8]| {
    let raw = to_block(data);
    journal_block(&raw);
    host_checkpoint(&raw);
    journal_block(&reseal(data, magic::JOURNAL, at::JOURNAL));
    host_checkpoint(&reseal(data, magic::HOST_CHECKPOINT, at::HOST_CHECKPOINT));
});
