//! Helpers the vhost test binaries share: a vhost-user front end without
//! a VM (`vhost`) and a `thinctl` process harness (`daemon`). Each binary
//! uses part of them.
#![allow(dead_code)]

pub mod daemon;
pub mod vhost;
