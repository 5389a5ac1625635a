//! Allocation: which physical blocks of the data area are in use
//! ([`space`], a bitmap with chunk cursors) and how many mapping leaves
//! share each shared block ([`refs`]). Knows the format's layout, nothing
//! of volumes.

pub(crate) mod refs;
pub(crate) mod space;
