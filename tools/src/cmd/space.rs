//! Space management: pool policy (`pool set`), `pool grow` and `trim`.

use super::daemon::ask;
use super::{open_or_served, open_read_write, pool_path, with_pool, Writer};
use crate::error::{emit, CliResult};
use crate::human::size;
use std::path::Path;
use thinlun_vhost::control::{Answer, PolicyChange, Request};

/// Up to three warning thresholds in percent (one clap value).
#[derive(Clone, Debug)]
pub struct Thresholds(pub Vec<u8>);

/// Changes to the pool policy; `None` keeps the current value.
pub struct PolicyArgs {
    pub data_thresholds: Option<Thresholds>,
    pub metadata_thresholds: Option<Thresholds>,
    pub when_full: Option<String>,
    pub queue_timeout_secs: Option<u32>,
    /// The limit in percent (0 = none), from [`overcommit_arg`].
    pub max_overcommit: Option<u32>,
}

/// Parses `--max-overcommit`: a ratio of at least 1 (2.5, 2.5x) or
/// "none"; the policy keeps it in percent, 0 for none.
pub fn overcommit_arg(r: &str) -> Result<u32, String> {
    if r == "none" {
        return Ok(0);
    }
    let ratio: f64 = r
        .trim_end_matches('x')
        .parse()
        .map_err(|_| format!("takes a ratio such as 2.5 or 'none', not '{r}'"))?;
    if !(1.0..=1_000_000.0).contains(&ratio) {
        return Err(format!("must be from 1.0 to 1000000, not {r}"));
    }
    // In range, so the product fits u32 and rounds to a whole percent.
    Ok((ratio * 100.0).round() as u32)
}

/// Parses "80,90,95" (up to three ascending percentages; "none" for none).
pub fn thresholds_arg(s: &str) -> Result<Thresholds, String> {
    if s == "none" {
        return Ok(Thresholds(Vec::new()));
    }
    let v: Vec<u8> = s
        .split(',')
        .map(|x| {
            x.trim()
                .trim_end_matches('%')
                .parse::<u8>()
                .map_err(|_| format!("'{x}' is not a percentage"))
        })
        .collect::<Result<_, _>>()?;
    if v.len() > 3 {
        return Err("at most three thresholds".into());
    }
    if let Some(x) = v.iter().find(|&&x| x == 0 || x > 100) {
        return Err(format!(
            "thresholds are percentages from 1 to 100, not {x} ('none' sets none)"
        ));
    }
    if v.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "thresholds must increase, e.g. 80,90,95 (given: {s})"
        ));
    }
    Ok(Thresholds(v))
}

/// The change `a` asks for, in the policy's raw values (checked here as
/// far as the arguments go; the engine checks the policy that results).
fn change_of(a: PolicyArgs) -> PolicyChange {
    let pad = |Thresholds(v): Thresholds| {
        let mut t = [0u8; 3];
        // Unused slots first, so the set ones stay ascending at the end.
        let skip = 3 - v.len();
        t[skip..].copy_from_slice(&v);
        t
    };
    let mut c = PolicyChange {
        data_warn_pct: a.data_thresholds.map(pad),
        meta_warn_pct: a.metadata_thresholds.map(pad),
        queue_timeout_ms: a.queue_timeout_secs.map(|s| s.saturating_mul(1000)),
        ..PolicyChange::default()
    };
    // clap accepts only these two (a usage error otherwise).
    c.when_full = a.when_full.map(|w| u8::from(w == "queue"));
    c.max_overcommit_pct = a.max_overcommit;
    c
}

pub fn set(pool: Option<&Path>, args: PolicyArgs) -> CliResult<()> {
    let change = change_of(args);
    let policy = match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => with_pool(pool, |p| {
            let new = change.apply(p.status().policy);
            p.set_policy(new)?;
            Ok(new)
        })?,
        Writer::Served(ctl) => {
            let req = Request::Policy { change };
            // The whole policy now, every field.
            match ask(&ctl, &req)? {
                Answer::Policy { policy } => match policy.complete() {
                    Some(p) => p,
                    None => {
                        return Err(super::daemon::unexpected(&Answer::Policy { policy }));
                    }
                },
                other => return Err(super::daemon::unexpected(&other)),
            }
        }
    };
    emit(&format!(
        "policy: data warnings at {}, metadata warnings at {}, when full: {}, overcommit limit: {}\n",
        percentages(&policy.data_warn_pct),
        percentages(&policy.meta_warn_pct),
        if policy.when_full == 1 {
            format!("queue writes up to {} s", policy.queue_timeout_ms / 1000)
        } else {
            "fail writes (ENOSPC)".to_string()
        },
        match policy.max_overcommit_pct {
            0 => "none".to_string(),
            x => format!("{:.2}x", x as f64 / 100.0),
        }
    ))
}

/// "80%, 90%, 95%", or "none": the thresholds as `pool set` takes them
/// (unused slots are 0).
fn percentages(pct: &[u8]) -> String {
    let set: Vec<String> = pct
        .iter()
        .filter(|&&x| x > 0)
        .map(|x| format!("{x}%"))
        .collect();
    if set.is_empty() {
        "none".to_string()
    } else {
        set.join(", ")
    }
}

pub fn grow(pool: Option<&Path>) -> CliResult<()> {
    let path = pool_path(pool)?;
    let pool = match super::open_unless_served(path, None) {
        Ok(p) => p,
        // Served by another process: it grows the pool it holds.
        Err(e @ thinlun::Error::Busy { .. }) => {
            return super::daemon::grow_via_control(path, &e.to_string())
        }
        Err(_) => open_read_write(path)?,
    };
    let (old, new) = with_pool(pool, |p| {
        let old = p.status().size_bytes;
        Ok((old, p.grow()?))
    })?;
    emit(&format!(
        "pool grown from {} to {} ({new} bytes)\n",
        size(old),
        size(new)
    ))
}

pub fn trim(pool: Option<&Path>, discard: bool) -> CliResult<()> {
    let pool = open_read_write(pool_path(pool)?)?;
    let bytes = with_pool(pool, |p| Ok(p.trim(discard)?))?;
    emit(&format!(
        "released {} ({bytes} bytes) of free space to the storage below\n",
        size(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse() {
        assert_eq!(thresholds_arg("80,90,95").unwrap().0, vec![80, 90, 95]);
        assert_eq!(thresholds_arg("85%").unwrap().0, vec![85]);
        assert!(thresholds_arg("none").unwrap().0.is_empty());
        assert!(thresholds_arg("80,x").is_err());
        assert!(thresholds_arg("1,2,3,4").is_err());
        assert!(thresholds_arg("300").is_err());
        assert!(thresholds_arg("0,50").unwrap_err().contains("1 to 100"));
        let e = thresholds_arg("95,80").unwrap_err();
        assert!(e.contains("must increase") && !e.contains('['), "{e}");
    }
}
