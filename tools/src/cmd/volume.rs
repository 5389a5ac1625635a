//! Volume life cycle: create, list, info, resize, rename, remove. `list`
//! shows snapshots under their volume.

use super::daemon::{ask, unexpected};
use super::{open_or_served, open_read_only, pool_path, with_pool, Writer};
use crate::error::{emit, CliError, CliResult};
use crate::human::{pct, pct_str, size, utc};
use crate::json::{obj, Json, Render};
use crate::size::SizeChange;
use crate::table::{fields, OutputArgs, Table};
use std::path::Path;
use thinlun::VolumeInfo;
use thinlun_vhost::control::{Answer, Request};

/// What `create` prints, made here or by a serving process.
fn created_text(name: &str, bytes: u64) -> String {
    format!("created volume '{name}' ({}, {bytes} bytes)\n", size(bytes))
}

pub fn create(pool: Option<&Path>, name: &str, bytes: u64, force: bool) -> CliResult<()> {
    let (name, bytes) = match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => {
            let info = with_pool(pool, |p| Ok(p.create_volume_with(name, bytes, force)?))?;
            (info.name, info.size_bytes)
        }
        Writer::Served(ctl) => {
            let req = Request::Create {
                name: name.to_string(),
                bytes,
                force,
            };
            match ask(&ctl, &req)? {
                Answer::Created { name, size_bytes } => (name, size_bytes),
                other => return Err(unexpected(&other)),
            }
        }
    };
    warn_overcommit(pool_path(pool)?);
    emit(&created_text(&name, bytes))
}

/// Whether `v` is of one of the `list -t` types (none given: all).
fn of_type(v: &VolumeInfo, types: &[String]) -> bool {
    types.is_empty()
        || types.iter().any(|t| match t.as_str() {
            "all" => true,
            "snapshot" => v.snapshot,
            "volume" => !v.snapshot,
            "base" => v.base,
            "clone" => v.clone_of.is_some() && !v.snapshot,
            _ => false,
        })
}

pub fn list(pool: Option<&Path>, types: &[String], out: &OutputArgs, json: bool) -> CliResult<()> {
    let pool = open_read_only(pool_path(pool)?)?;
    let vols: Vec<VolumeInfo> = tree_order(with_pool(pool, |p| Ok(p.volumes()))?)
        .into_iter()
        .filter(|v| of_type(v, types))
        .collect();
    if json {
        let items: Vec<Json> = vols.iter().map(info_json).collect();
        return emit(&Json::Array(items).render());
    }
    // Snapshots are indented under their volume only for people, and only
    // when their volumes are listed too.
    let indent = !out.scripted && of_type_all(types);
    let mut t = Table::new(&[
        ("NAME", false),
        ("SIZE", true),
        ("MAPPED", true),
        ("USE%", true),
        ("EXTENTS", true),
        ("FLAGS", false),
        ("ORIGIN", false),
        ("CREATED", false),
    ]);
    for v in &vols {
        t.row(vec![
            if indent {
                indented_name(v)
            } else {
                v.name.clone()
            },
            out.size(v.size_bytes),
            out.size(v.mapped_bytes),
            pct_str(v.mapped_bytes, v.size_bytes),
            v.extents.to_string(),
            flags(v),
            origin(v),
            out.time(v.created_unix),
        ]);
    }
    emit(&t.render_as(out)?)?;
    let damaged = vols.iter().filter(|v| !v.damage.is_empty()).count();
    if damaged > 0 && !out.scripted {
        eprintln!(
            "warning: {damaged} volume{} damaged (flag 'damaged'): reads of the unreadable range and all writes fail; 'thinctl check' says what is lost",
            if damaged == 1 { " is" } else { "s are" }
        );
    }
    Ok(())
}

fn of_type_all(types: &[String]) -> bool {
    types.is_empty() || types.iter().any(|t| t == "all")
}

/// Volumes by name, each followed by its snapshots, oldest first (what
/// `list` and `du` show).
pub fn tree_order(vols: Vec<VolumeInfo>) -> Vec<VolumeInfo> {
    let (mut snaps, vols): (Vec<VolumeInfo>, Vec<VolumeInfo>) =
        vols.into_iter().partition(|v| v.snapshot);
    // By creation time; ids grow, so they order snapshots of one second.
    snaps.sort_by_key(|s| (s.created_unix, s.id));
    let mut out = Vec::with_capacity(vols.len() + snaps.len());
    for v in vols {
        let name = v.name.clone();
        out.push(v);
        let (mine, rest): (Vec<VolumeInfo>, Vec<VolumeInfo>) = snaps
            .into_iter()
            .partition(|s| s.snapshot_of.as_deref() == Some(name.as_str()));
        out.extend(mine);
        snaps = rest;
    }
    // Snapshots whose volume is unknown (none expected) still show.
    out.extend(snaps);
    out
}

/// Snapshots indented under their volume.
pub fn indented_name(v: &VolumeInfo) -> String {
    if v.snapshot {
        format!("  {}", v.name)
    } else {
        v.name.clone()
    }
}

/// What a volume derives from: a snapshot's volume, a clone's source.
fn origin(v: &VolumeInfo) -> String {
    match (&v.snapshot_of, &v.clone_of) {
        (_, Some(c)) => format!("clone of {c}"),
        (Some(s), None) => format!("snapshot of {s}"),
        (None, None) => "-".to_string(),
    }
}

pub fn info(pool: Option<&Path>, name: &str, out: &OutputArgs, json: bool) -> CliResult<()> {
    let pool = open_read_only(pool_path(pool)?)?;
    let v = with_pool(pool, |p| Ok(p.volume_info(name)?))?;
    if json {
        return emit(&info_json(&v).render());
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    // Exact figures stand beside the rounded ones for people; --bytes and
    // -H give the exact figure alone.
    let exact = out.bytes || out.scripted;
    let sized = |b: u64| {
        if exact {
            b.to_string()
        } else {
            format!("{} ({b} bytes)", size(b))
        }
    };
    let rows: Vec<(&str, String)> = vec![
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        ("size", sized(v.size_bytes)),
        (
            "mapped",
            if exact {
                v.mapped_bytes.to_string()
            } else {
                format!(
                    "{} ({} bytes, {} of the size)",
                    size(v.mapped_bytes),
                    v.mapped_bytes,
                    pct_str(v.mapped_bytes, v.size_bytes)
                )
            },
        ),
        ("extents", v.extents.to_string()),
        ("read-only", yes_no(v.read_only)),
        ("snapshot", yes_no(v.snapshot)),
        ("base", yes_no(v.base)),
        ("origin", origin(&v)),
        ("damage", damage_text(&v)),
        (
            "created",
            if exact {
                v.created_unix.to_string()
            } else {
                format!("{} ({})", utc(v.created_unix), v.created_unix)
            },
        ),
    ];
    let ids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    let picked: Vec<(&str, String)> = out
        .select(&ids)?
        .into_iter()
        .map(|i| rows[i].clone())
        .collect();
    if out.scripted {
        // One line, the values alone, tab-separated (as a list row).
        let values: Vec<String> = picked.into_iter().map(|r| r.1).collect();
        return emit(&format!("{}\n", values.join("\t")));
    }
    emit(&fields(&picked))
}

pub fn resize(pool: Option<&Path>, name: &str, change: SizeChange, force: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    // Past the ends it depends on the volume's size: a runtime error.
    let target = |current: u64| change.apply(current).map_err(CliError::new);
    let (old, new) = match open_or_served(path, None)? {
        Writer::Open(pool) => with_pool(pool, |p| {
            let info = p.volume_info(name)?;
            // The engine resizes read-only volumes too, which would change a
            // snapshot's or base's content: refuse here until it does.
            if info.read_only {
                return Err(thinlun::Error::ReadOnly(info.name).into());
            }
            let bytes = target(info.size_bytes)?;
            Ok((
                info.size_bytes,
                p.resize_volume(name, bytes, force)?.size_bytes,
            ))
        })?,
        Writer::Served(ctl) => {
            let bytes = match change {
                SizeChange::To(b) => b,
                // The serving process holds the pool; a read-only open
                // still sees the volume's size.
                _ => target(with_pool(open_read_only(path)?, |p| {
                    Ok(p.volume_info(name)?.size_bytes)
                })?)?,
            };
            let req = Request::Resize {
                name: name.to_string(),
                bytes,
                force,
            };
            match ask(&ctl, &req)? {
                Answer::Resized {
                    old_size_bytes,
                    size_bytes,
                    ..
                } => (old_size_bytes, size_bytes),
                other => return Err(unexpected(&other)),
            }
        }
    };
    if new > old {
        warn_overcommit(path);
    }
    emit(&format!(
        "resized volume '{name}' from {} to {} ({new} bytes)\n",
        size(old),
        size(new),
    ))
}

/// Warns, as lvcreate does for thin pools, when the volumes' sizes add up
/// to more than the pool's data space: writes then fail (or queue) once
/// the space runs out, whatever the volumes' sizes promise. Read after the
/// change, so it sees what a serving process did too; a pool that cannot
/// be read here just gets no warning.
pub fn warn_overcommit(path: &Path) {
    let opts = thinlun::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let Ok(p) = thinlun::Pool::open_path(path, &opts) else {
        return;
    };
    let s = p.status();
    let _ = p.close();
    if s.provisioned_bytes > s.data_bytes {
        eprintln!(
            "thinctl: warning: the volumes now provision {} on {} of data space ({:.2}x overcommitted); writes {} once the data space is full ('thinctl pool status' shows its use)",
            crate::human::size(s.provisioned_bytes),
            crate::human::size(s.data_bytes),
            crate::human::ratio(s.provisioned_bytes, s.data_bytes),
            if s.policy.when_full == 1 { "wait" } else { "fail" },
        );
    }
}

pub fn rename(pool: Option<&Path>, old: &str, new: &str) -> CliResult<()> {
    match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => with_pool(pool, |p| Ok(p.rename_volume(old, new)?))?,
        Writer::Served(ctl) => {
            let req = Request::Rename {
                old: old.to_string(),
                new: new.to_string(),
            };
            ask(&ctl, &req)?;
        }
    }
    emit(&format!("renamed volume '{old}' to '{new}'\n"))
}

pub fn remove(pool: Option<&Path>, name: &str, recursive: bool) -> CliResult<()> {
    let (snapshot, snaps) = match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => with_pool(pool, |p| {
            let info = p.volume_info(name)?;
            let snaps: Vec<String> = p
                .volumes()
                .into_iter()
                .filter(|s| s.snapshot_of.as_deref() == Some(name))
                .map(|s| s.name)
                .collect();
            p.remove_volume(name, recursive)?;
            Ok((info.snapshot, snaps))
        })?,
        Writer::Served(ctl) => {
            // `delete`: the daemon's `remove` stops serving a volume.
            let req = Request::Delete {
                name: name.to_string(),
                recursive,
            };
            match ask(&ctl, &req)? {
                Answer::Deleted {
                    snapshot,
                    snapshots,
                    ..
                } => (snapshot, snapshots),
                other => return Err(unexpected(&other)),
            }
        }
    };
    emit(&removed_text(name, snapshot, &snaps))
}

/// What `remove` prints: `snaps` went with the volume.
fn removed_text(name: &str, snapshot: bool, snaps: &[String]) -> String {
    if snapshot {
        format!("removed snapshot '{name}'\n")
    } else if snaps.is_empty() {
        format!("removed volume '{name}'\n")
    } else {
        format!(
            "removed volume '{name}' and its snapshots {}\n",
            snaps.join(", ")
        )
    }
}

fn flags(v: &VolumeInfo) -> String {
    let set: Vec<&str> = [
        (v.read_only, "ro"),
        (v.snapshot, "snap"),
        (v.base, "base"),
        (v.clone_of.is_some(), "clone"),
        // Part of its mapping tree is unreadable: `thinctl check` says what.
        (!v.damage.is_empty(), "damaged"),
    ]
    .iter()
    .filter(|f| f.0)
    .map(|f| f.1)
    .collect();
    if set.is_empty() {
        "-".to_string()
    } else {
        set.join(",")
    }
}

/// A damaged range as the `--json` of info, list and check shows it.
pub fn damage_fields(d: &thinlun::DamagedRange) -> Vec<(&'static str, Json)> {
    vec![
        ("start_sector", d.sectors().0.into()),
        ("end_sector", d.sectors().1.into()),
        ("start_byte", d.bytes().0.into()),
        ("end_byte", d.bytes().1.into()),
        ("node_block", d.node_block.into()),
        ("reason", d.reason.as_str().into()),
    ]
}

/// A volume's unreadable ranges for `info`: "-" when healthy.
fn damage_text(v: &VolumeInfo) -> String {
    if v.damage.is_empty() {
        return "-".to_string();
    }
    v.damage
        .iter()
        .map(|d| {
            let (s0, s1) = d.sectors();
            let (b0, b1) = d.bytes();
            format!(
                "sectors {s0}..{s1} (bytes {b0}..{b1}) unreadable: {}",
                d.reason
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn info_json(v: &VolumeInfo) -> Json {
    let mut fields = vec![
        ("name", v.name.as_str().into()),
        ("id", v.id.into()),
        ("size_bytes", v.size_bytes.into()),
        ("mapped_bytes", v.mapped_bytes.into()),
        ("mapped_pct", pct(v.mapped_bytes, v.size_bytes).into()),
        ("extents", v.extents.into()),
        ("read_only", v.read_only.into()),
        ("snapshot", v.snapshot.into()),
        ("base", v.base.into()),
        ("clone", v.clone_of.is_some().into()),
        ("created_unix", v.created_unix.into()),
        ("damaged", (!v.damage.is_empty()).into()),
    ];
    if !v.damage.is_empty() {
        let ranges: Vec<Json> = v.damage.iter().map(|d| obj(damage_fields(d))).collect();
        fields.push(("damage", Json::Array(ranges)));
    }
    // Present only when they apply (the JSON writer has no null).
    if let Some(s) = &v.snapshot_of {
        fields.push(("snapshot_of", s.as_str().into()));
    }
    if let Some(c) = &v.clone_of {
        fields.push(("clone_of", c.as_str().into()));
    }
    obj(fields)
}
