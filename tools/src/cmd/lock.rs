//! `lock status` and `release`: the leases of a shared pool.

use super::{open_read_only, pool_path, with_pool};
use crate::error::{emit, CliError, CliResult};
use crate::json::{obj, Json, Render};
use crate::table::{OutputArgs, Table};
use std::path::Path;
use std::time::Duration;
use thinlun::LockStatus;

pub fn status(pool: Option<&Path>, out: &OutputArgs, json: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    let pool = open_read_only(path)?;
    // Watch the slots for two renewal periods to tell renewing hosts from
    // silent ones (one reading says nothing about liveness).
    let st = with_pool(pool, |p| {
        let io_timeout = p.status().shared_io_timeout_ms.unwrap_or(0) as u64;
        Ok(p.lock_status(Duration::from_millis(4 * io_timeout + 100))?)
    })?;
    if json {
        emit(&status_json(&st).render())
    } else {
        emit(&status_text(&st, out)?)
    }
}

fn status_text(s: &LockStatus, fmt: &OutputArgs) -> CliResult<String> {
    let mut t = Table::new(&[
        ("HOST", false),
        ("NAME", false),
        ("GENERATION", true),
        ("RENEWALS", true),
        ("LAST CHANGE", true),
        ("STATE", false),
    ]);
    for h in &s.hosts {
        let change = match h.unchanged_ms {
            None => "-".to_string(),
            Some(ms) if fmt.bytes => ms.to_string(),
            Some(ms) => format!("{ms} ms ago"),
        };
        let state = match (h.state, h.watched_ms, h.dead_in_ms) {
            ("unknown", Some(w), Some(d)) => format!(
                "silent (watched {:.1} s, dead in {:.1} s if unchanged)",
                w as f64 / 1000.0,
                d as f64 / 1000.0
            ),
            (s, _, _) => s.to_string(),
        };
        t.row(vec![
            h.host_id.to_string(),
            h.name.clone(),
            h.generation.to_string(),
            h.renewal.to_string(),
            change,
            state,
        ]);
    }
    let hosts = t.render_as(fmt)?;
    // Scripts get the host rows alone; the rest is in --json.
    if fmt.scripted || fmt.fields.is_some() {
        return Ok(hosts);
    }
    let mut out = format!("I/O timeout {} ms\n", s.io_timeout_ms);
    out.push_str(&hosts);
    let name_of = |id: u32| {
        s.hosts
            .iter()
            .find(|h| h.host_id == id)
            .map_or(format!("host {id}"), |h| format!("host {id} ({})", h.name))
    };
    let lock = if s.global_lock.is_empty() {
        "free".to_string()
    } else {
        let who: Vec<String> = s.global_lock.iter().map(|&h| name_of(h)).collect();
        format!("held or wanted by {}", who.join(", "))
    };
    out.push_str(&format!("global lock: {lock}\n"));
    if s.active_volumes.is_empty() {
        out.push_str("active volumes: none\n");
    } else {
        out.push_str("active volumes:\n");
        for (v, h, _) in &s.active_volumes {
            out.push_str(&format!("  {v}: {}\n", name_of(*h)));
        }
    }
    let mut per_host: Vec<(u32, usize)> = Vec::new();
    for &(_, owner) in &s.groups {
        match per_host.iter_mut().find(|(h, _)| *h == owner) {
            Some(e) => e.1 += 1,
            None => per_host.push((owner, 1)),
        }
    }
    for (h, n) in per_host {
        out.push_str(&format!(
            "allocation groups claimed by {}: {n}\n",
            name_of(h)
        ));
    }
    Ok(out)
}

fn status_json(s: &LockStatus) -> Json {
    obj(vec![
        ("io_timeout_ms", s.io_timeout_ms.into()),
        (
            "hosts",
            Json::Array(
                s.hosts
                    .iter()
                    .map(|h| {
                        let mut fields = vec![
                            ("host_id", h.host_id.into()),
                            ("name", h.name.as_str().into()),
                            ("generation", h.generation.into()),
                            ("renewals", h.renewal.into()),
                            ("state", h.state.into()),
                        ];
                        // A silent host: how long this process watched it,
                        // and when it will count as dead.
                        if let (Some(w), Some(d)) = (h.watched_ms, h.dead_in_ms) {
                            fields.push(("watched_ms", w.into()));
                            fields.push(("dead_in_ms", d.into()));
                        }
                        obj(fields)
                    })
                    .collect(),
            ),
        ),
        ("global_lock", s.global_lock.clone().into()),
        (
            "active_volumes",
            Json::Array(
                s.active_volumes
                    .iter()
                    .map(|(v, h, g)| {
                        obj(vec![
                            ("volume", v.as_str().into()),
                            ("host_id", (*h).into()),
                            ("host_generation", (*g).into()),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "groups",
            Json::Array(
                s.groups
                    .iter()
                    .map(|&(g, h)| obj(vec![("group", g.into()), ("owner", h.into())]))
                    .collect(),
            ),
        ),
    ])
}

/// Releases this host's activation of a volume. When a process on this
/// host serves it, that process stops serving it (which releases it).
pub fn release(pool: Option<&Path>, name: &str) -> CliResult<()> {
    let path = pool_path(pool)?;
    super::require_exists(path)?;
    // Not open_read_write: a serving process holding this host's id keeps
    // the pool, so waiting for it (up to --wait) would only delay asking
    // it on its control socket.
    let pool = match super::open_unless_served(path, None) {
        Ok(p) => {
            super::report_warnings(&p);
            p
        }
        Err(
            e @ thinlun::Error::Busy {
                kind: thinlun::BusyKind::HostIdInUseHere,
                ..
            },
        ) => {
            let control = thinlun_vhost::control::default_control_path(path);
            if !control.exists() {
                return Err(e.into());
            }
            let req = thinlun_vhost::control::Request::Remove {
                name: name.to_string(),
                socket: None,
            };
            let stopped = match super::daemon::ask(&control, &req)? {
                thinlun_vhost::control::Answer::Stopped { summaries } => summaries.join("; "),
                other => return Err(super::daemon::unexpected(&other)),
            };
            return emit(&format!(
                "{stopped}\nreleased '{name}': the serving process stopped serving it\n"
            ));
        }
        Err(e) => return Err(e.into()),
    };
    with_pool(pool, |p| {
        if p.status().shared_io_timeout_ms.is_none() {
            return Err(not_shared(path));
        }
        Ok(p.release_volume(name)?)
    })?;
    emit(&format!("released '{name}'\n"))
}

/// `--io-timeout`: milliseconds, or a number with `ms` or `s`.
pub fn io_timeout_arg(s: &str) -> Result<u32, String> {
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    let v: u32 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (use e.g. 10s or 250ms)"))?;
    match v.checked_mul(mul) {
        Some(ms) if (10..=600_000).contains(&ms) => Ok(ms),
        _ => Err(format!("I/O timeout '{s}' must be from 10ms to 600s")),
    }
}

/// Errors of `release` that only a shared pool can explain.
pub fn not_shared(path: &Path) -> CliError {
    CliError::new(format!(
        "{} is a single-host pool: volumes have no leases to release",
        path.display()
    ))
}
