//! Snapshots, base images, linked clones, rollback, flatten, usage and
//! incremental backups: the argument definitions of these commands (merged
//! into thinctl's top level) and the small ones themselves. `du` and the
//! diff commands are in their own modules.

use super::daemon::{ask, unexpected};
use super::{open_or_served, open_read_write, pool_path, with_pool, Writer};
use crate::error::{emit, CliResult};
use crate::human::size;
use crate::progress::Progress;
use clap::Subcommand;
use std::path::{Path, PathBuf};
use thinlun::Pool;
use thinlun_vhost::control::{Answer, Request};

#[derive(Subcommand)]
pub enum SnapCommand {
    /// Take a read-only, crash-consistent snapshot VOL@SNAP (O(1))
    Snapshot {
        /// The volume and the new snapshot's name
        #[arg(value_name = "VOL@SNAP")]
        name: String,
        /// Control socket of the process serving the pool, asked when the
        /// pool is held by it [default: <pool path>.ctl]
        #[arg(long, value_name = "PATH", env = "THINLUN_CONTROL")]
        control: Option<PathBuf>,
    },
    /// Make a volume the content of its snapshot VOL@SNAP again (O(1))
    Rollback {
        /// The snapshot to return its volume to
        #[arg(value_name = "VOL@SNAP")]
        name: String,
        /// Also remove the volume's snapshots newer than VOL@SNAP
        #[arg(long)]
        force: bool,
    },
    /// Turn a volume into a read-only base image that clones can share
    Base {
        /// Volume to turn into a base image
        name: String,
        /// Rename it too (e.g. vm-100-disk-0 -> base-100-disk-0)
        #[arg(long = "name", value_name = "NEW")]
        name_as: Option<String>,
    },
    /// Make a writable linked clone NEW of a base image or snapshot (O(1))
    Clone {
        /// Base image or snapshot (VOL@SNAP) to clone
        #[arg(value_name = "SRC")]
        source: String,
        /// Name of the new clone
        new: String,
    },
    /// Copy the data a linked clone still shares, making it independent
    Flatten {
        /// Linked clone to make independent
        name: String,
    },
    /// Space per volume and snapshot: provisioned, mapped, exclusive, shared
    Du {
        /// One volume (with its snapshots) or one snapshot; default: all
        name: Option<String>,
        #[command(flatten)]
        output: crate::table::OutputArgs,
    },
    /// List the extents that differ between a snapshot and a later snapshot or its volume
    Diff {
        /// The earlier snapshot
        #[arg(value_name = "VOL@SNAP")]
        from: String,
        /// A later snapshot of the same volume, or the volume itself
        #[arg(value_name = "VOL[@SNAP]")]
        to: String,
    },
    /// Write the changes from FROM to TO as an incremental backup stream
    #[command(
        override_usage = "thinctl export-diff [--force] FROM TO FILE|-\n       \
                          thinctl export-diff [--force] [--from SNAP] TO FILE|-",
        after_help = "FROM is VOL@SNAP or SNAP (a snapshot of TO's volume); - or leaving it out\n\
                      makes a full stream (everything TO holds). TO is VOL@SNAP or the live VOL.\n\
                      FILE - is stdout. Apply the stream with 'thinctl import-diff VOL FILE|-'."
    )]
    ExportDiff {
        /// [FROM] TO FILE|- (see below)
        #[arg(num_args = 2..=3, required = true, value_name = "ARG")]
        args: Vec<String>,
        /// Snapshot the changes start from (instead of a FROM argument)
        #[arg(long, value_name = "SNAP")]
        from: Option<String>,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
    },
    /// Apply an incremental backup stream onto VOL (which must hold its starting snapshot)
    ImportDiff {
        /// Volume to apply the stream onto
        #[arg(value_name = "VOL")]
        name: String,
        /// Stream file, or - for stdin
        file: PathBuf,
    },
}

pub fn run(pool: Option<&Path>, c: SnapCommand, json: bool) -> CliResult<()> {
    match c {
        SnapCommand::Snapshot { name, control } => snapshot(pool, &name, control.as_deref()),
        SnapCommand::Rollback { name, force } => rollback(pool, &name, force),
        SnapCommand::Base { name, name_as } => base(pool, &name, name_as.as_deref()),
        SnapCommand::Clone { source, new } => clone(pool, &source, &new),
        SnapCommand::Flatten { name } => flatten(pool, &name),
        SnapCommand::Du { name, output } => super::du::run(pool, name.as_deref(), &output, json),
        SnapCommand::Diff { from, to } => super::diff::diff(pool, &from, &to, json),
        SnapCommand::ExportDiff { args, from, force } => {
            super::diff::export(pool, &args, from.as_deref(), force)
        }
        SnapCommand::ImportDiff { name, file } => super::diff::import(pool, &name, &file),
    }
}

fn snapshot(pool: Option<&Path>, name: &str, control: Option<&Path>) -> CliResult<()> {
    let path = pool_path(pool)?;
    super::require_exists(path)?;
    let pool = match super::open_unless_served(path, control) {
        // Held by a serving process: it takes the snapshot (crash-consistent
        // with the guests' in-flight writes).
        Err(thinlun::Error::Busy { message: why, .. }) => {
            return super::daemon::snapshot_via_control(path, control, name, &why);
        }
        r => r?,
    };
    super::report_warnings(&pool);
    let info = with_pool(pool, |p| Ok(p.create_snapshot(name)?))?;
    emit(&format!(
        "created snapshot '{}' ({} mapped)\n",
        info.name,
        size(info.mapped_bytes)
    ))
}

/// Names of the snapshots of `name`'s volume newer than `name`.
fn newer_snapshots(p: &Pool, name: &str) -> Vec<String> {
    let Ok(snap) = p.volume_info(name) else {
        return Vec::new();
    };
    p.volumes()
        .into_iter()
        .filter(|v| v.snapshot && v.snapshot_of == snap.snapshot_of && v.id > snap.id)
        .map(|v| v.name)
        .collect()
}

fn rollback(pool: Option<&Path>, name: &str, force: bool) -> CliResult<()> {
    let removed = match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => with_pool(pool, |p| {
            let newer = newer_snapshots(p, name);
            p.rollback(name, force)?;
            Ok(newer)
        })?,
        Writer::Served(ctl) => {
            let req = Request::Rollback {
                snapshot: name.to_string(),
                force,
            };
            match ask(&ctl, &req)? {
                Answer::RolledBack { removed, .. } => removed,
                other => return Err(unexpected(&other)),
            }
        }
    };
    let vol = name.split_once('@').map_or(name, |x| x.0);
    let mut out = format!("rolled back '{vol}' to '{name}'\n");
    if !removed.is_empty() {
        out.push_str(&format!(
            "removed newer snapshots: {}\n",
            removed.join(", ")
        ));
    }
    emit(&out)
}

fn base(pool: Option<&Path>, name: &str, new_name: Option<&str>) -> CliResult<()> {
    let now = match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => with_pool(pool, |p| Ok(p.make_base(name, new_name)?))?.name,
        Writer::Served(ctl) => {
            let req = Request::Base {
                name: name.to_string(),
                new_name: new_name.map(str::to_string),
            };
            match ask(&ctl, &req)? {
                Answer::Based { name } => name,
                other => return Err(unexpected(&other)),
            }
        }
    };
    let renamed = if now != name {
        format!(" (renamed from '{name}')")
    } else {
        String::new()
    };
    emit(&format!("'{now}' is now a read-only base image{renamed}\n"))
}

fn clone(pool: Option<&Path>, source: &str, new: &str) -> CliResult<()> {
    let (name, bytes, shared) = match open_or_served(pool_path(pool)?, None)? {
        Writer::Open(pool) => {
            let info = with_pool(pool, |p| Ok(p.clone_volume(source, new)?))?;
            (info.name, info.size_bytes, info.mapped_bytes)
        }
        Writer::Served(ctl) => {
            let req = Request::Clone {
                source: source.to_string(),
                new: new.to_string(),
            };
            match ask(&ctl, &req)? {
                Answer::Cloned {
                    name,
                    size_bytes,
                    mapped_bytes,
                } => (name, size_bytes, mapped_bytes),
                other => return Err(unexpected(&other)),
            }
        }
    };
    emit(&format!(
        "created linked clone '{name}' of '{source}' ({}, {} shared)\n",
        size(bytes),
        size(shared)
    ))
}

fn flatten(pool: Option<&Path>, name: &str) -> CliResult<()> {
    let pool = open_read_write(pool_path(pool)?)?;
    let (origin, copied) = with_pool(pool, |p| {
        let origin = p.volume_info(name)?.clone_of;
        let mut bar = Progress::new(format!("flattening '{name}'"), |blocks| {
            size(blocks * thinlun::BLOCK_SIZE as u64)
        });
        let mut total = 0;
        let r = p.flatten(name, &mut |done, all| {
            total = all;
            bar.update(done, all);
        });
        bar.finish();
        r?;
        Ok((origin, total * thinlun::BLOCK_SIZE as u64))
    })?;
    let was = origin.map_or(String::new(), |o| format!(" from '{o}'"));
    emit(&format!(
        "flattened '{name}': copied the {} ({copied} bytes) it shared{was}; it is independent now\n",
        size(copied)
    ))
}
