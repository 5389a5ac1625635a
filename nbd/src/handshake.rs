//! The fixed newstyle handshake: options until OPT_GO (or
//! OPT_EXPORT_NAME) picks an export, OPT_ABORT, or the client goes away.

use crate::exports::{Export, Exports};
use crate::proto::*;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// What the client negotiated for the transmission phase.
pub struct Negotiated {
    /// The name the export is listed under.
    pub name: String,
    pub export: Arc<Export>,
    pub structured: bool,
    /// base:allocation was selected (BLOCK_STATUS is allowed).
    pub allocation: bool,
}

/// Why a handshake ended without an export.
#[derive(Debug)]
pub enum Ended {
    /// OPT_ABORT or a disconnect: nothing to report.
    Quit,
    /// The client broke the protocol; the connection is closed.
    Protocol(String),
    Io(io::Error),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Ended {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Ended::Quit
        } else {
            Ended::Io(e)
        }
    }
}

pub fn transmission_flags(e: &Export) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        // FLUSH commits the whole pool, so one connection's flush covers
        // writes completed on every other.
        | TF_CAN_MULTI_CONN;
    if e.read_only {
        f |= TF_READ_ONLY;
    }
    f
}

pub fn negotiate<S: Read + Write>(s: &mut S, exports: &Exports) -> Result<Negotiated, Ended> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client = u32::from_be_bytes(cf);
    if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(Ended::Protocol(format!("unknown client flags {client:#x}")));
    }
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut allocation = false;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let h = parse_option_header(&h).map_err(|_| Ended::Protocol("bad option magic".into()))?;
        if h.len > MAX_OPTION_BYTES {
            return Err(Ended::Protocol(format!(
                "option {} of {} bytes (at most {MAX_OPTION_BYTES})",
                h.option, h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut S, kind: u32, d: &[u8]| s.write_all(&option_reply(h.option, kind, d));
        match h.option {
            OPT_EXPORT_NAME => {
                // No way to answer an error here but closing.
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some((name, export)) = exports.resolve(&name) else {
                    return Err(Ended::Protocol(format!("no export '{name}'")));
                };
                let mut r = Vec::with_capacity(134);
                r.extend_from_slice(&export.volume.size_bytes().to_be_bytes());
                r.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                return Ok(Negotiated {
                    name,
                    export,
                    structured,
                    allocation,
                });
            }
            OPT_ABORT => {
                let _ = reply(s, REP_ACK, &[]);
                return Err(Ended::Quit);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, REP_ERR_INVALID, b"OPT_LIST takes no data")?;
                    continue;
                }
                for name in exports.names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(s, REP_SERVER, &d)?;
                }
                reply(s, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(s, REP_ERR_INVALID, b"OPT_STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                structured = true;
                reply(s, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                let Ok(req) = parse_meta_request(&data) else {
                    reply(s, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                if set && !structured {
                    reply(s, REP_ERR_INVALID, b"structured replies come first")?;
                    continue;
                }
                if exports.get(&req.name).is_none() {
                    reply(s, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let wanted = if set {
                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == "base:" || q == BASE_ALLOCATION)
                };
                if set {
                    allocation = wanted;
                }
                if wanted {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(s, REP_META_CONTEXT, &d)?;
                }
                reply(s, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Ok(req) = parse_info_request(&data) else {
                    reply(s, REP_ERR_INVALID, b"malformed info request")?;
                    continue;
                };
                let Some((name, export)) = exports.resolve(&req.name) else {
                    let msg = format!("no export '{}'", req.name);
                    reply(s, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                send_info(s, h.option, &req, &export)?;
                reply(s, REP_ACK, &[])?;
                if h.option == OPT_GO {
                    return Ok(Negotiated {
                        name,
                        export,
                        structured,
                        allocation,
                    });
                }
            }
            // No TLS here: the server listens on Unix sockets only.
            OPT_STARTTLS => reply(s, REP_ERR_UNSUP, b"no TLS: Unix sockets only")?,
            _ => reply(s, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn send_info<S: Write>(s: &mut S, option: u32, req: &InfoRequest, e: &Export) -> io::Result<()> {
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&e.volume.size_bytes().to_be_bytes());
    export.extend_from_slice(&transmission_flags(e).to_be_bytes());
    s.write_all(&option_reply(option, REP_INFO, &export))?;
    // Block sizes are always sent: requests must be sector-aligned.
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    bs.extend_from_slice(&(thinlun::SECTOR_SIZE as u32).to_be_bytes());
    bs.extend_from_slice(&e.preferred_bytes.to_be_bytes());
    bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    s.write_all(&option_reply(option, REP_INFO, &bs))?;
    if req.infos.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.volume.name().as_bytes());
        s.write_all(&option_reply(option, REP_INFO, &d))?;
    }
    if req.infos.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(b"thinlun volume");
        s.write_all(&option_reply(option, REP_INFO, &d))?;
    }
    Ok(())
}
