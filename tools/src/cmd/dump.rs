//! `dump` and `restore`: the pool's metadata as a readable JSON document
//! (docs/FORMAT.md section 9) and back, as thin_dump / thin_restore do.

use super::{pool_path, require_exists};
use crate::error::{emit, CliError, CliResult};
use crate::human::{counted, volumes_and_snapshots};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use thinlun::dev::FileDevice;
use thinlun::dump::{MetadataDump, RestoreOptions};

/// Writes the dump to `output` (a file, or stdout when `None` or `-`).
/// Reads only: works without write access and while the pool is served.
pub fn dump(pool: Option<&Path>, output: Option<&Path>) -> CliResult<()> {
    let path = pool_path(pool)?;
    require_exists(path)?;
    let label = path.display().to_string();
    let dev = FileDevice::open(path, false).map_err(|e| CliError::io(&label, e))?;
    let d = thinlun::dump::dump(&dev, &label).map_err(|e| {
        CliError::new(format!(
            "{e} (the pool must load to be dumped; 'thinctl check' says what is wrong)"
        ))
    })?;
    let text = d.to_json();
    match output {
        Some(out) if out != Path::new("-") => {
            let name = out.display().to_string();
            std::fs::write(out, text).map_err(|e| CliError::io(&name, e))?;
            let extents: usize = d.volumes.iter().map(|v| v.extents.len()).sum();
            let snapshots = d
                .volumes
                .iter()
                .filter(|v| v.flags & thinlun::volume_flags::SNAPSHOT != 0)
                .count() as u64;
            eprintln!(
                "thinctl: {label}: {}, {} dumped to {name}",
                volumes_and_snapshots(d.volumes.len() as u64 - snapshots, snapshots),
                counted(extents as u64, "extent"),
            );
            Ok(())
        }
        _ => emit(&text),
    }
}

pub fn restore(pool: Option<&Path>, input: &Path, force: bool, dry_run: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    require_exists(path)?;
    let label = path.display().to_string();
    let in_name = input.display().to_string();
    let mut text = String::new();
    let read = if input == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(input).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| CliError::io(&in_name, e))?;
    let d = MetadataDump::from_json(&text).map_err(|e| CliError::new(format!("{in_name}: {e}")))?;
    let dev = FileDevice::open(path, !dry_run).map_err(|e| CliError::io(&label, e))?;
    if !dry_run {
        dev.lock_exclusive().map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                CliError::new(format!(
                    "{label} is open for writing by another thinlun process; stop it first"
                ))
            } else {
                CliError::io(&label, e)
            }
        })?;
    }
    let opts = RestoreOptions { force, dry_run };
    let r = thinlun::dump::restore(Arc::new(dev), &label, &d, &opts)?;
    let mut out = String::new();
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push_str(&format!(
        "{label}: {} {} ({}) from {in_name}: {} metadata blocks, superblock generation {}{}\n",
        if dry_run { "would restore" } else { "restored" },
        volumes_and_snapshots(r.volumes, r.snapshots),
        counted(r.extents, "extent"),
        r.metadata_blocks,
        r.generation,
        if dry_run {
            " (dry run: verified in memory, nothing written)".to_string()
        } else {
            format!("; {} blocks written", r.blocks_written)
        }
    ));
    emit(&out)
}
