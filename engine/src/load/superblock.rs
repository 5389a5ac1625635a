//! Superblock choice: the valid copy with the newer generation, and telling
//! "superblocks destroyed" from "never a pool".

use crate::dev::{read_block, read_blocks, BlockDevice};
use crate::error::{Error, Result};
use crate::format::superblock::{has_magic, Superblock};
use crate::format::{BLOCK_SIZE, SUPERBLOCK_A, SUPERBLOCK_B};

/// Reads both superblock copies and picks the valid one with the newer
/// generation.
pub(crate) fn read_superblock(
    dev: &dyn BlockDevice,
    label: &str,
    warnings: &mut Vec<String>,
) -> Result<Superblock> {
    let size = dev.size_bytes().map_err(|e| Error::io(label, e))?;
    if size < (SUPERBLOCK_B + 1) * BLOCK_SIZE as u64 {
        return Err(Error::NotAPool(label.to_string()));
    }
    let mut copies = Vec::new();
    let mut saw_magic = false;
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        let b = read_block(dev, at).map_err(|e| Error::io(format!("{label}: superblock"), e))?;
        saw_magic |= has_magic(&b);
        copies.push((at, Superblock::decode(&b, at)));
    }
    if !saw_magic {
        if has_other_pool_records(dev, size) {
            return Err(Error::Corrupt(format!(
                "{label} holds thinlun metadata but both superblock copies are missing (overwritten?)"
            )));
        }
        return Err(Error::NotAPool(label.to_string()));
    }
    for (_, r) in &copies {
        if let Err(e @ Error::UnsupportedVersion { .. }) = r {
            return Err(Error::UnsupportedVersion {
                found: match e {
                    Error::UnsupportedVersion { found, .. } => *found,
                    _ => 0,
                },
                supported: crate::format::FORMAT_VERSION,
            });
        }
    }
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for (at, r) in copies {
        match r {
            Ok(sb) => {
                if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                    if let Some(b) = &best {
                        warnings.push(format!(
                            "superblock copy at block {} is older (generation {}) than the other; it will be rewritten",
                            if at == SUPERBLOCK_A { SUPERBLOCK_B } else { SUPERBLOCK_A },
                            b.generation
                        ));
                    }
                    best = Some(sb);
                } else if best.as_ref().is_some_and(|b| sb.generation < b.generation) {
                    warnings.push(format!(
                        "superblock copy at block {at} is older (generation {}) than the other; it will be rewritten",
                        sb.generation
                    ));
                }
            }
            Err(e) => errors.push(format!("copy at block {at}: {e}")),
        }
    }
    match best {
        Some(sb) => {
            for e in errors {
                warnings.push(format!("damaged superblock {e}; using the other copy"));
            }
            let need = sb.layout.pool_blocks * BLOCK_SIZE as u64;
            if size < need {
                return Err(Error::Corrupt(format!(
                    "{label} is {size} bytes but the pool needs {need}: the file or LUN was truncated"
                )));
            }
            Ok(sb)
        }
        None => Err(Error::Corrupt(format!(
            "both superblock copies are damaged ({})",
            errors.join("; ")
        ))),
    }
}

/// Whether the start of the LUN holds records only a pool writes (its
/// allocation-group table sits right after the header zone and lock areas),
/// to tell "superblocks destroyed" from "never a pool".
fn has_other_pool_records(dev: &dyn BlockDevice, size: u64) -> bool {
    use crate::format::magic;
    let end = (size / BLOCK_SIZE as u64).min(1024);
    let blocks: Vec<u64> = (crate::format::HEADER_ZONE_BLOCKS..end).collect();
    read_blocks(dev, &blocks, "scanning for pool records").is_ok_and(|bufs| {
        (0..blocks.len()).any(|i| {
            let m = &bufs[i][0..8];
            m == magic::AG_TABLE || m == magic::HOST_CHECKPOINT
        })
    })
}
