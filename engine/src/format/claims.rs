//! Allocation-group claim table: one 16-byte record per 1 GiB allocation
//! group saying which host allocates inside it. Written under the global
//! lock; a single-host pool leaves every group unclaimed (owner 0).

use super::codec::{self, get_u16, get_u64, put_u16, put_u64, Header, HEADER_LEN};
use super::{magic, AG_CLAIM_LEN, BLOCK_SIZE};
use crate::error::{Error, Result};

/// Claim records one table block holds (254).
pub const CLAIMS_PER_BLOCK: usize = (BLOCK_SIZE - HEADER_LEN) / AG_CLAIM_LEN;

/// Who allocates in one allocation group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// Host id that allocates in this group; 0 = unclaimed.
    pub owner: u16,
    /// Bumped on every change of owner.
    pub generation: u64,
}

/// Encodes claim-table block `index` (claims for groups
/// `index*CLAIMS_PER_BLOCK ..`).
pub fn encode(claims: &[Claim], generation: u64, at_block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    for (i, c) in claims.iter().take(CLAIMS_PER_BLOCK).enumerate() {
        let off = HEADER_LEN + i * AG_CLAIM_LEN;
        put_u16(&mut b, off, c.owner);
        put_u64(&mut b, off + 8, c.generation);
    }
    codec::seal(
        &mut b,
        &Header {
            magic: *magic::AG_TABLE,
            aux: 0,
            self_block: at_block,
            seq: generation,
        },
    );
    b
}

/// Decodes the claim-table block read from `at_block`: all
/// [`CLAIMS_PER_BLOCK`] claims, each owner checked against `max_hosts`.
pub fn decode(b: &[u8], at_block: u64, max_hosts: u32) -> Result<Vec<Claim>> {
    codec::open(b, magic::AG_TABLE, at_block, "allocation-group table")?;
    (0..CLAIMS_PER_BLOCK)
        .map(|i| {
            let off = HEADER_LEN + i * AG_CLAIM_LEN;
            let owner = get_u16(b, off);
            if owner as u32 > max_hosts {
                return Err(Error::Corrupt(format!(
                    "allocation-group table block {at_block}: group {i} owned by host {owner}, beyond the pool's {max_hosts} hosts"
                )));
            }
            Ok(Claim {
                owner,
                generation: get_u64(b, off + 8),
            })
        })
        .collect()
}
