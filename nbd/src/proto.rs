//! The NBD wire format (the NBD project's doc/proto.md): constants and
//! fixed-layout big-endian records. Pure functions, no I/O, so the parsers
//! can be fuzzed.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types of OPT_INFO / OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The one metadata context served, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Errors sent to the client (errno values, as the protocol fixes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// Longest option payload a client may send; longer ones close the
/// connection (nothing legitimate comes near: names are at most 4 KiB).
pub const MAX_OPTION_BYTES: u32 = 64 << 10;

/// Largest READ or WRITE payload, as advertised in INFO_BLOCK_SIZE.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// An option header's fields after IHAVEOPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    BadMagic,
    TooShort,
    TooLong,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ParseError> {
    if be64(&b[0..8]) != IHAVEOPT {
        return Err(ParseError::BadMagic);
    }
    Ok(OptionHeader {
        option: be32(&b[8..12]),
        len: be32(&b[12..16]),
    })
}

/// The export name and info requests of OPT_INFO / OPT_GO.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ParseError> {
    let mut r = Cursor(data);
    let name = r.string()?;
    let n = r.u16()? as usize;
    let mut infos = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        infos.push(r.u16()?);
    }
    r.end()?;
    Ok(InfoRequest { name, infos })
}

/// The export name and queries of OPT_SET/LIST_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, ParseError> {
    let mut r = Cursor(data);
    let name = r.string()?;
    let n = r.u32()? as usize;
    let mut queries = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        queries.push(r.string()?);
    }
    r.end()?;
    Ok(MetaRequest { name, queries })
}

/// One transmission-phase request header (28 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_BYTES: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_BYTES]) -> Result<Request, ParseError> {
    if be32(&b[0..4]) != REQUEST_MAGIC {
        return Err(ParseError::BadMagic);
    }
    Ok(Request {
        flags: be16(&b[4..6]),
        kind: be16(&b[6..8]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        len: be32(&b[24..28]),
    })
}

/// An option reply: header and payload.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A simple reply header (data, if any, follows).
pub fn simple_reply(handle: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A final error chunk with a message for the client's log.
pub fn error_chunk(handle: u64, err: NbdError, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(512)];
    let mut v = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&(err as u32).to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Bounds-checked reads from an option payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ParseError> {
        if self.0.len() < n {
            return Err(ParseError::TooShort);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ParseError> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, ParseError> {
        self.take(4).map(be32)
    }
    /// A u32 length, then that many bytes of (lossy) UTF-8.
    fn string(&mut self) -> Result<String, ParseError> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return Err(ParseError::TooLong);
        }
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn end(&self) -> Result<(), ParseError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ParseError::TooLong)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_and_meta_requests() {
        let mut d = Vec::new();
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(b"vm");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: "vm".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert_eq!(parse_info_request(&d[..7]), Err(ParseError::TooShort));
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), Err(ParseError::TooLong));
        // A name length past the end.
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(parse_info_request(&bad), Err(ParseError::TooShort));

        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta_request(&m),
            Ok(MetaRequest {
                name: String::new(),
                queries: vec![BASE_ALLOCATION.into()]
            })
        );
        // A query count far past the payload fails without allocating it.
        m[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&m), Err(ParseError::TooShort));
    }

    #[test]
    fn parses_requests_and_rejects_bad_magic() {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            (r.flags, r.kind, r.handle, r.offset, r.len),
            (1, 1, 7, 4096, 512)
        );
        b[0] ^= 1;
        assert_eq!(parse_request(&b), Err(ParseError::BadMagic));
    }

    #[test]
    fn encodes_replies() {
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &REPLY_MAGIC.to_be_bytes());
        let e = error_chunk(9, NbdError::Perm, "read-only");
        assert_eq!(&e[16..20], &(6u32 + 9).to_be_bytes());
        assert_eq!(&e[20..24], &1u32.to_be_bytes());
    }
}
