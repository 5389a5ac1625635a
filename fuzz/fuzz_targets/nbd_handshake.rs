#![no_main]
//! The NBD server's handshake (thinlun_nbd::handshake::negotiate) and the
//! wire parsers, on any bytes a client may send. The handshake must end
//! (the input runs out, or the client is closed) without a panic, and
//! with no export it can never reach the transmission phase.

use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};
use thinlun_nbd::exports::Exports;
use thinlun_nbd::handshake::negotiate;
use thinlun_nbd::proto;

/// A client: reads come from the input, replies go nowhere.
struct Client<'a>(Cursor<&'a [u8]>);

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = Exports::default();
    let mut c = Client(Cursor::new(data));
    assert!(negotiate(&mut c, &exports).is_err(), "no export to go to");

    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_request(data);
    if let Ok(h) = <&[u8; proto::REQUEST_BYTES]>::try_from(data.get(..proto::REQUEST_BYTES).unwrap_or(&[])) {
        let _ = proto::parse_request(h);
    }
    if let Ok(h) = <&[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
        let _ = proto::parse_option_header(h);
    }
});
