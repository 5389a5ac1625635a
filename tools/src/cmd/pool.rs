//! `pool create` and `pool status`.

use super::{open_read_only, pool_path, with_pool, BLOCK};
use crate::error::{emit, CliError, CliResult};
use crate::human::{counted, pct, pct_str, ratio, size};
use crate::json::{obj, Json, Render};
use crate::table::fields;
use std::path::Path;
use thinlun::{Policy, Pool, PoolConfig, PoolStatus};

pub struct CreateArgs {
    pub size: Option<u64>,
    pub chunk_size: Option<u64>,
    pub max_hosts: Option<u32>,
    pub journal_size: Option<u64>,
    pub ditto_nodes: bool,
    pub force: bool,
    pub shared: Option<thinlun::SharedConfig>,
}

pub fn create(pool: Option<&Path>, args: CreateArgs) -> CliResult<()> {
    let path = pool_path(pool)?;
    // Unaligned sizes would be rounded down silently by the engine.
    for (what, value) in [
        ("pool size", args.size),
        ("journal size", args.journal_size),
    ] {
        if let Some(v) = value.filter(|v| v % BLOCK as u64 != 0) {
            return Err(CliError::new(format!(
                "{what} {v} is not a multiple of 4 KiB"
            )));
        }
    }
    let existed = path.exists();
    if !existed && args.size.is_none() {
        return Err(CliError::new(format!(
            "{} does not exist; give --size to create it",
            path.display()
        )));
    }
    if existed {
        super::foreign::check_not_in_use(path)?;
        if !args.force {
            if let Some(what) = super::foreign::existing_content(path)? {
                return Err(CliError::new(format!(
                    "{} holds {what}; use --force to overwrite it",
                    path.display()
                )));
            }
        }
    }
    let defaults = PoolConfig::default();
    let cfg = PoolConfig {
        size_bytes: args.size,
        chunk_bytes: args.chunk_size.unwrap_or(defaults.chunk_bytes),
        max_hosts: args.max_hosts.unwrap_or(defaults.max_hosts),
        journal_bytes: args.journal_size,
        force: args.force,
        shared: args.shared,
        ditto_nodes: args.ditto_nodes,
    };
    let created = match Pool::create_path(path, &cfg) {
        Ok(p) => p,
        Err(e) => {
            // Do not leave behind a file this command made for a pool that
            // was never written.
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    let status = with_pool(created, |p| Ok(p.status()))?;
    let sharing = match status.shared_io_timeout_ms {
        Some(ms) => format!(
            "shared by up to {} hosts (I/O timeout {ms} ms)",
            status.max_hosts
        ),
        None => "single host".to_string(),
    };
    emit(&format!(
        "created pool {}: {} ({} for data), chunk size {}, {sharing}, uuid {}\n",
        path.display(),
        size(status.size_bytes),
        size(status.data_bytes),
        size(status.chunk_bytes),
        status.uuid
    ))
}

pub fn status(pool: Option<&Path>, json: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    let pool = open_read_only(path)?;
    let (label, st) = with_pool(pool, |p| Ok((p.label().to_string(), p.status())))?;
    if json {
        emit(&status_json(&label, &st).render())
    } else {
        emit(&status_text(&label, &st))
    }
}

fn status_text(label: &str, s: &PoolStatus) -> String {
    let with_bytes = |b: u64| format!("{} ({b} bytes)", size(b));
    let thresholds = |t: &[u8; 3]| {
        let set: Vec<String> = t
            .iter()
            .filter(|&&p| p > 0)
            .map(|p| format!("{p}%"))
            .collect();
        if set.is_empty() {
            "none".to_string()
        } else {
            set.join(", ")
        }
    };
    let p = &s.policy;
    fields(&[
        ("pool", label.to_string()),
        ("uuid", s.uuid.clone()),
        ("format version", s.format_version.to_string()),
        ("node copies", s.node_copies.to_string()),
        ("size", with_bytes(s.size_bytes)),
        ("chunk size", size(s.chunk_bytes)),
        ("data size", with_bytes(s.data_bytes)),
        (
            "data used",
            format!(
                "{} ({})",
                size(s.data_used_bytes),
                pct_str(s.data_used_bytes, s.data_bytes)
            ),
        ),
        (
            "data free",
            format!(
                "{} ({})",
                size(s.data_free_bytes),
                pct_str(s.data_free_bytes, s.data_bytes)
            ),
        ),
        ("awaiting reuse", size(s.pending_free_bytes)),
        ("metadata used", size(s.metadata_used_bytes)),
        ("metadata reserved", size(s.metadata_reserved_bytes)),
        ("metadata use", format!("{}%", s.metadata_used_pct)),
        (
            "volumes",
            format!(
                "{} (of them {}, {})",
                s.volumes,
                counted(s.bases, "base image"),
                counted(s.clones, "linked clone")
            ),
        ),
        ("snapshots", s.snapshots.to_string()),
        ("provisioned", size(s.provisioned_bytes)),
        (
            "overcommit",
            format!("{:.2}x", ratio(s.provisioned_bytes, s.data_bytes)),
        ),
        (
            "journal",
            format!(
                "{} of {} blocks used ({})",
                s.journal_used_blocks,
                s.journal_capacity_blocks,
                pct_str(
                    s.journal_used_blocks.into(),
                    s.journal_capacity_blocks.into()
                )
            ),
        ),
        ("max hosts", s.max_hosts.to_string()),
        (
            "sharing",
            match s.shared_io_timeout_ms {
                Some(ms) => format!("shared through leases, I/O timeout {ms} ms"),
                None => "single host (local lock)".to_string(),
            },
        ),
        (
            "thresholds crossed",
            if s.thresholds_crossed.is_empty() {
                "none".to_string()
            } else {
                s.thresholds_crossed.join(", ")
            },
        ),
        ("data warnings at", thresholds(&p.data_warn_pct)),
        ("metadata warnings at", thresholds(&p.meta_warn_pct)),
        ("when full", when_full(p)),
        (
            "max overcommit",
            match p.max_overcommit_pct {
                0 => "no limit".to_string(),
                pct => format!("{:.2}x", pct as f64 / 100.0),
            },
        ),
    ])
}

fn when_full(p: &Policy) -> String {
    match p.when_full {
        0 => "fail writes (ENOSPC)".to_string(),
        1 => format!("queue writes for up to {} ms", p.queue_timeout_ms),
        other => format!("unknown policy {other}"),
    }
}

fn status_json(label: &str, s: &PoolStatus) -> Json {
    let p = &s.policy;
    let thresholds =
        |t: &[u8; 3]| Json::from(t.iter().copied().filter(|&v| v > 0).collect::<Vec<u8>>());
    obj(vec![
        ("pool", label.into()),
        ("uuid", s.uuid.as_str().into()),
        ("format_version", s.format_version.into()),
        ("node_copies", s.node_copies.into()),
        ("size_bytes", s.size_bytes.into()),
        ("chunk_bytes", s.chunk_bytes.into()),
        ("data_bytes", s.data_bytes.into()),
        ("data_used_bytes", s.data_used_bytes.into()),
        ("data_used_pct", pct(s.data_used_bytes, s.data_bytes).into()),
        ("data_free_bytes", s.data_free_bytes.into()),
        ("data_free_pct", pct(s.data_free_bytes, s.data_bytes).into()),
        ("pending_free_bytes", s.pending_free_bytes.into()),
        ("metadata_used_bytes", s.metadata_used_bytes.into()),
        ("metadata_reserved_bytes", s.metadata_reserved_bytes.into()),
        ("metadata_used_pct", (s.metadata_used_pct as u64).into()),
        ("volumes", s.volumes.into()),
        ("snapshots", s.snapshots.into()),
        ("bases", s.bases.into()),
        ("clones", s.clones.into()),
        (
            "thresholds_crossed",
            Json::Array(
                s.thresholds_crossed
                    .iter()
                    .map(|t| t.as_str().into())
                    .collect(),
            ),
        ),
        ("provisioned_bytes", s.provisioned_bytes.into()),
        (
            "overcommit_ratio",
            ratio(s.provisioned_bytes, s.data_bytes).into(),
        ),
        ("journal_used_blocks", s.journal_used_blocks.into()),
        ("journal_capacity_blocks", s.journal_capacity_blocks.into()),
        ("max_hosts", s.max_hosts.into()),
        ("shared", s.shared_io_timeout_ms.is_some().into()),
        ("io_timeout_ms", s.shared_io_timeout_ms.unwrap_or(0).into()),
        (
            "policy",
            obj(vec![
                ("data_warn_pct", thresholds(&p.data_warn_pct)),
                ("meta_warn_pct", thresholds(&p.meta_warn_pct)),
                (
                    "when_full",
                    match p.when_full {
                        0 => "fail",
                        1 => "queue",
                        _ => "unknown",
                    }
                    .into(),
                ),
                ("queue_timeout_ms", p.queue_timeout_ms.into()),
                ("max_overcommit_pct", p.max_overcommit_pct.into()),
            ]),
        ),
    ])
}
