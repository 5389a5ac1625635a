//! Mapping: a volume's extent map in memory ([`extmap`]) and the in-memory
//! state of an open pool built from them ([`state`]: volumes, space,
//! shared-block references, pending journal entries, the rules for reusing
//! freed space).

pub(crate) mod extmap;
pub(crate) mod state;
