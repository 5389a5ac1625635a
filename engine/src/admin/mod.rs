//! Administration of a pool, above the pool layer: [`check`] (verify
//! everything, read-only), [`repair`] (fix what redundancy determines),
//! [`salvage`] (rebuild a damaged volume's tree from what is readable),
//! [`dump`] (metadata as JSON and back), and [`diffstream`] (incremental
//! export and import between snapshots). Nothing below imports them.

pub mod check;
pub mod diffstream;
pub mod dump;
pub mod repair;
pub mod salvage;
