//! Lease records of a shared pool: one host-slot block per host id (the
//! delta lease a host renews to say it is alive) and one lock-register
//! block per host id (its ticket in the global lock). See docs/LOCKING.md.
//!
//! A block of zeros is a slot or register never used; it decodes to `None`.

use super::codec::{self, get_u32, get_u64, put_u32, put_u64, Header};
use super::{magic, BLOCK_SIZE};
use crate::error::{Error, Result};

/// Longest host name a slot stores, in bytes; longer names are cut.
pub const HOST_NAME_LEN: usize = 64;

/// What a host slot says about its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Released cleanly: the host left the pool and holds nothing.
    Free = 0,
    /// Joined: renewed every renewal interval while the host lives.
    Live = 1,
}

/// A host's delta lease: the block it renews to say it is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSlot {
    /// The host id the slot belongs to (its index).
    pub host_id: u32,
    /// Whether the host is in the pool.
    pub state: SlotState,
    /// Incarnation: grows by one each time a process takes the slot.
    pub generation: u64,
    /// Random per incarnation: tells two processes with one id apart.
    pub nonce: u64,
    /// Bumped on every renewal; other hosts watch it change and never
    /// compare it with a clock of their own.
    pub renewal: u64,
    /// The renewing host's own boot-time clock, in ms, for display only.
    pub local_ms: u64,
    /// Host name of the process that holds the slot, for messages.
    pub name: String,
}

const O_HOST_ID: usize = 32;
const O_STATE: usize = 36;
const O_GENERATION: usize = 40;
const O_NONCE: usize = 48;
const O_LOCAL_MS: usize = 56;
const O_NAME_LEN: usize = 64;
const O_NAME: usize = 68;

impl HostSlot {
    /// The slot's block as it is written at block `at_block`.
    pub fn encode(&self, at_block: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        put_u32(&mut b, O_HOST_ID, self.host_id);
        put_u32(&mut b, O_STATE, self.state as u32);
        put_u64(&mut b, O_GENERATION, self.generation);
        put_u64(&mut b, O_NONCE, self.nonce);
        put_u64(&mut b, O_LOCAL_MS, self.local_ms);
        let name = truncate_name(&self.name);
        put_u32(&mut b, O_NAME_LEN, name.len() as u32);
        b[O_NAME..O_NAME + name.len()].copy_from_slice(name.as_bytes());
        codec::seal(
            &mut b,
            &Header {
                magic: *magic::HOST_SLOT,
                aux: 0,
                self_block: at_block,
                seq: self.renewal,
            },
        );
        b
    }

    /// `Ok(None)` for a never-used (all-zero) slot.
    pub fn decode(b: &[u8], at_block: u64, expect_host: u32) -> Result<Option<HostSlot>> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let hdr = codec::open(b, magic::HOST_SLOT, at_block, "host slot")?;
        let bad = |what: &str| Error::Corrupt(format!("host slot at block {at_block}: {what}"));
        let host_id = get_u32(b, O_HOST_ID);
        if host_id != expect_host {
            return Err(bad("holds another host's id"));
        }
        let state = match get_u32(b, O_STATE) {
            0 => SlotState::Free,
            1 => SlotState::Live,
            _ => return Err(bad("unknown state")),
        };
        let name_len = get_u32(b, O_NAME_LEN) as usize;
        if name_len > HOST_NAME_LEN {
            return Err(bad("host name too long"));
        }
        let name = std::str::from_utf8(&b[O_NAME..O_NAME + name_len])
            .map_err(|_| bad("host name is not UTF-8"))?
            .to_string();
        Ok(Some(HostSlot {
            host_id,
            state,
            generation: get_u64(b, O_GENERATION),
            nonce: get_u64(b, O_NONCE),
            renewal: hdr.seq,
            local_ms: get_u64(b, O_LOCAL_MS),
            name,
        }))
    }
}

fn truncate_name(name: &str) -> &str {
    let mut end = name.len().min(HOST_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A host's ticket in the global lock (Lamport's bakery over single-writer
/// registers: each host writes only its own block).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockRegister {
    /// The host that owns the register.
    pub host_id: u32,
    /// The incarnation that wrote it; a register of an older incarnation
    /// (or of a host found dead) is ignored.
    pub host_generation: u64,
    /// The host is picking its ticket number.
    pub choosing: bool,
    /// Ticket; 0 = not waiting for or holding the lock.
    pub number: u64,
}

const O_REG_HOST: usize = 32;
const O_REG_CHOOSING: usize = 36;
const O_REG_GENERATION: usize = 40;
const O_REG_NUMBER: usize = 48;

impl LockRegister {
    /// The register's block as it is written at block `at_block`.
    pub fn encode(&self, at_block: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        put_u32(&mut b, O_REG_HOST, self.host_id);
        put_u32(&mut b, O_REG_CHOOSING, self.choosing as u32);
        put_u64(&mut b, O_REG_GENERATION, self.host_generation);
        put_u64(&mut b, O_REG_NUMBER, self.number);
        codec::seal(
            &mut b,
            &Header {
                magic: *magic::LOCK_REGISTER,
                aux: 0,
                self_block: at_block,
                seq: self.number,
            },
        );
        b
    }

    /// `Ok(None)` for a never-used register.
    pub fn decode(b: &[u8], at_block: u64, expect_host: u32) -> Result<Option<LockRegister>> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        codec::open(b, magic::LOCK_REGISTER, at_block, "lock register")?;
        let host_id = get_u32(b, O_REG_HOST);
        if host_id != expect_host {
            return Err(Error::Corrupt(format!(
                "lock register at block {at_block} holds another host's id"
            )));
        }
        let choosing = match get_u32(b, O_REG_CHOOSING) {
            0 => false,
            1 => true,
            _ => {
                return Err(Error::Corrupt(format!(
                    "lock register at block {at_block}: bad choosing flag"
                )))
            }
        };
        Ok(Some(LockRegister {
            host_id,
            host_generation: get_u64(b, O_REG_GENERATION),
            choosing,
            number: get_u64(b, O_REG_NUMBER),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_roundtrip_and_zero_block() {
        let s = HostSlot {
            host_id: 3,
            state: SlotState::Live,
            generation: 7,
            nonce: 99,
            renewal: 12,
            local_ms: 5000,
            name: "hv-03".into(),
        };
        let b = s.encode(18);
        assert_eq!(HostSlot::decode(&b, 18, 3).unwrap(), Some(s));
        assert!(HostSlot::decode(&b, 18, 4).is_err());
        assert!(HostSlot::decode(&b, 19, 3).is_err());
        assert_eq!(HostSlot::decode(&[0u8; BLOCK_SIZE], 18, 3).unwrap(), None);
    }

    #[test]
    fn register_roundtrip_and_torn_block() {
        let r = LockRegister {
            host_id: 2,
            host_generation: 4,
            choosing: true,
            number: 41,
        };
        let mut b = r.encode(40);
        assert_eq!(LockRegister::decode(&b, 40, 2).unwrap(), Some(r));
        b[100] ^= 1;
        assert!(LockRegister::decode(&b, 40, 2).is_err());
    }
}
