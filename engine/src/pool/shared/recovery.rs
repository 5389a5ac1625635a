//! Recovering a dead host: folding its journal into the trees, then
//! freeing its slot.

use super::groups::{read_claims, write_claims};
use crate::dev::{read_block, write_blocks, BlockDevice};
use crate::error::Result;
use crate::format::lease::{HostSlot, SlotState};
use crate::format::Layout;
use crate::pool::Inner;

impl Inner {
    /// Replays a dead host's journal into the trees of the volumes it had
    /// active, exactly as that host would on its next start, by opening
    /// the pool as that host (allocating only in its groups) and closing it.
    pub(super) fn recover_host(&self, dead: &HostSlot) -> Result<()> {
        let layout = self.state.lock().sb.layout;
        let mut claims = read_claims(self.dev.as_ref(), &layout)?;
        let d = dead.host_id;
        if !claims.iter().any(|c| c.owner as u32 == d) {
            // The recovery checkpoint needs somewhere to write nodes.
            if let Some(c) = claims.iter_mut().find(|c| c.owner == 0) {
                c.owner = d as u16;
                c.generation += 1;
                write_claims(self.dev.as_ref(), &layout, &claims, 1)?;
            }
        }
        log::info!(
            "host {d} ('{}') is dead; replaying its journal and releasing its volumes",
            dead.name
        );
        let tmp =
            crate::Pool::open_for_recovery(self.dev.clone(), &self.label, d, &claims, self.boot)?;
        tmp.close()
    }
}

/// Marks a recovered host's slot free, unless it changed meanwhile (the
/// host restarted and rejoined).
pub(super) fn free_dead_slot(
    dev: &dyn BlockDevice,
    layout: &Layout,
    dead: &HostSlot,
    fingerprint: u32,
) {
    let at = layout.host_slot(dead.host_id);
    let Ok(b) = read_block(dev, at) else { return };
    if crc32fast::hash(&b) != fingerprint {
        return;
    }
    let mut free = dead.clone();
    free.state = SlotState::Free;
    free.renewal += 1;
    let _ = write_blocks(dev, &[(at, free.encode(at))]);
}
