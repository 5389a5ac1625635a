//! The I/O path of an open pool: planning a batch's mapping changes
//! ([`plan`], pure: what to allocate, copy and journal), carrying a batch out
//! on one volume ([`volume`]: reads, writes, copy-on-write, flush) and
//! queues that keep many requests in flight ([`queue`]).

pub(crate) mod plan;
pub(crate) mod queue;
pub(crate) mod volume;
