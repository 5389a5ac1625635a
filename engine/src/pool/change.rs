//! The one order in which a change to the pool's metadata takes its
//! locks (docs/LOCKING.md): the global lock of a shared pool, then the
//! commit path, then the in-memory state. [`Inner::pool_change`] takes
//! them; the guard gives the state and lets go of all three in reverse.
//!
//! A change is made in memory first and then written to the catalog;
//! [`Inner::write_catalog_or_undo`] takes it back when that write fails.

use super::commit::CommitCtl;
use super::Inner;
use crate::error::Result;
use crate::lease::GlobalGuard;
use crate::map::state::State;
use parking_lot::MutexGuard;
use std::ops::{Deref, DerefMut};

/// The locks of one pool change, derefs to the state.
pub(crate) struct PoolChange<'a> {
    // Fields drop in declaration order: the state first, the global lock
    // last, the reverse of how they were taken.
    st: MutexGuard<'a, State>,
    _commit: MutexGuard<'a, Option<CommitCtl>>,
    _global: Option<GlobalGuard>,
}

impl Inner {
    /// Takes the global lock (on a shared pool, refreshing the state from
    /// the LUN), the commit path and the state, in that order.
    pub(crate) fn pool_change(&self) -> Result<PoolChange<'_>> {
        let global = self.global()?;
        let commit = self.commit.lock();
        let st = self.state.lock();
        Ok(PoolChange {
            st,
            _commit: commit,
            _global: global,
        })
    }

    /// Writes the catalog with the change `st` holds; if that fails,
    /// `undo` puts the in-memory state back as it was before the change
    /// (the LUN still has the old catalog), and the write's error is
    /// returned.
    pub(crate) fn write_catalog_or_undo(
        &self,
        st: &mut State,
        undo: impl FnOnce(&mut State),
    ) -> Result<()> {
        let r = self.write_catalog(st);
        if r.is_err() {
            undo(st);
        }
        r
    }
}

impl Deref for PoolChange<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl DerefMut for PoolChange<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.st
    }
}
