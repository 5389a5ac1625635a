//! `repair` (and `check --repair`): fixes what the redundant copies and
//! the update protocols determine, refuses the rest; exit codes as fsck
//! (0 nothing to repair, 1 repaired, 4 errors left, 8 could not run).

use super::{pool_path, require_exists};
use crate::error::{
    emit, CliError, CliResult, EXIT_CHECK_ERRORS, EXIT_CHECK_FAILED, EXIT_CHECK_REPAIRED,
};
use crate::json::{obj, Json, Render};
use std::path::Path;
use std::sync::Arc;
use thinlun::dev::FileDevice;
use thinlun::repair::RepairReport;
use thinlun::salvage::SalvageReport;

/// Opens the pool file for a repair: shared (read-only) for a dry run, else
/// read-write and locked exclusively.
fn open_for_repair(path: &Path, label: &str, dry_run: bool) -> CliResult<FileDevice> {
    let failed = |e: CliError| e.with_code(EXIT_CHECK_FAILED);
    require_exists(path).map_err(failed)?;
    // A dry run only reads, like check; a repair needs the pool to itself.
    let dev = FileDevice::open(path, !dry_run).map_err(|e| failed(CliError::io(label, e)))?;
    if !dry_run {
        dev.lock_exclusive().map_err(|e| {
            failed(if e.kind() == std::io::ErrorKind::WouldBlock {
                CliError::new(format!(
                    "{label} is open for writing by another thinlun process (serve or daemon); stop it before repairing, or use 'thinctl check --read-only'"
                ))
            } else {
                CliError::io(label, e)
            })
        })?;
    }
    Ok(dev)
}

/// `repair --salvage VOL...`: exit 1 salvaged (as repaired), 4 refused or
/// damage left in volumes not named, 8 could not run.
pub fn salvage(pool: Option<&Path>, names: &[String], dry_run: bool, json: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    let failed = |e: CliError| e.with_code(EXIT_CHECK_FAILED);
    let label = path.display().to_string();
    let dev = open_for_repair(path, &label, dry_run)?;
    let report = thinlun::salvage::salvage(Arc::new(dev), &label, names, dry_run)
        .map_err(|e| failed(e.into()))?;
    if json {
        emit(&salvage_json(&label, &report).render())?;
    } else {
        emit(&salvage_text(&label, &report))?;
    }
    if !report.refused.is_empty() {
        return Err(
            CliError::new(format!("{label}: not salvaged; nothing was written"))
                .with_code(EXIT_CHECK_ERRORS),
        );
    }
    let left = report.after.as_ref().map_or(0, |a| a.errors.len());
    if left > 0 {
        return Err(CliError::new(format!(
            "{label}: {left} damaged range{} left in volumes not salvaged",
            if left == 1 { "" } else { "s" }
        ))
        .with_code(EXIT_CHECK_ERRORS));
    }
    if report.blocks_written > 0 {
        return Err(CliError::new("").with_code(EXIT_CHECK_REPAIRED));
    }
    Ok(())
}

fn salvage_text(label: &str, r: &SalvageReport) -> String {
    let mut out = String::new();
    if r.refused.is_empty() {
        let verb = if r.dry_run {
            "would salvage"
        } else {
            "salvaged"
        };
        for s in &r.salvaged {
            for d in &s.lost {
                let (s0, s1) = d.sectors();
                let (b0, b1) = d.bytes();
                out.push_str(&format!(
                    "{verb} '{}': sectors {s0}..{s1} (bytes {b0}..{b1}, {}) now read as zeros; lost with {}\n",
                    s.volume,
                    human(b1 - b0),
                    d.reason
                ));
            }
            if s.lost_blocks > 0 {
                out.push_str(&format!(
                    "note: the lost part of '{}' mapped {} data block{} ({}); those no other tree uses are free once no damaged tree holds them\n",
                    s.volume,
                    s.lost_blocks,
                    if s.lost_blocks == 1 { "" } else { "s" },
                    human(s.lost_blocks * thinlun::BLOCK_SIZE as u64)
                ));
            }
            if !s.shared_with.is_empty() {
                out.push_str(&format!(
                    "note: the unreadable node of '{}' is also in {}: they stay damaged; salvage them with --salvage too, or restore them\n",
                    s.volume,
                    s.shared_with
                        .iter()
                        .map(|n| format!("'{n}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    for e in &r.refused {
        out.push_str(&format!("error: {e}\n"));
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let verdict = if !r.refused.is_empty() {
        "not salvaged; nothing was written".to_string()
    } else if r.dry_run {
        "salvage verified in memory (dry run: nothing was written)".to_string()
    } else {
        let left = r.after.as_ref().map_or(0, |a| a.errors.len());
        format!(
            "salvaged ({} block{} written); {}",
            r.blocks_written,
            if r.blocks_written == 1 { "" } else { "s" },
            if left == 0 {
                "check is clean".to_string()
            } else {
                format!(
                    "check still reports {left} error{} (damage of volumes not salvaged)",
                    if left == 1 { "" } else { "s" }
                )
            }
        )
    };
    out.push_str(&format!("{label}: {verdict}\n"));
    out
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn salvage_json(label: &str, r: &SalvageReport) -> Json {
    let clean_after = r.after.as_ref().is_some_and(|a| a.errors.is_empty());
    let salvaged: Vec<Json> = r
        .salvaged
        .iter()
        .map(|s| {
            let lost: Vec<Json> = s
                .lost
                .iter()
                .map(|d| {
                    let (s0, s1) = d.sectors();
                    let (b0, b1) = d.bytes();
                    obj(vec![
                        ("start_sector", s0.into()),
                        ("end_sector", s1.into()),
                        ("start_byte", b0.into()),
                        ("end_byte", b1.into()),
                        ("node_block", d.node_block.into()),
                        ("reason", d.reason.clone().into()),
                    ])
                })
                .collect();
            obj(vec![
                ("volume", s.volume.clone().into()),
                ("zeroed", Json::Array(lost)),
                ("lost_blocks", s.lost_blocks.into()),
                ("still_damaged", s.shared_with.clone().into()),
            ])
        })
        .collect();
    obj(vec![
        ("pool", label.into()),
        ("dry_run", r.dry_run.into()),
        ("salvaged", Json::Array(salvaged)),
        ("refused", r.refused.clone().into()),
        ("notes", r.notes.clone().into()),
        ("blocks_written", r.blocks_written.into()),
        ("clean_after", clean_after.into()),
    ])
}

pub fn run(pool: Option<&Path>, dry_run: bool, json: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    let failed = |e: CliError| e.with_code(EXIT_CHECK_FAILED);
    let label = path.display().to_string();
    let dev = open_for_repair(path, &label, dry_run)?;
    let report =
        thinlun::repair::repair(Arc::new(dev), &label, dry_run).map_err(|e| failed(e.into()))?;
    if json {
        emit(&report_json(&label, &report).render())?;
    } else {
        emit(&report_text(&label, &report))?;
    }
    if !report.refused.is_empty() {
        let n = report.refused.len();
        return Err(CliError::new(format!(
            "{label}: {n} problem{} cannot be repaired without guessing; nothing was written",
            if n == 1 { "" } else { "s" }
        ))
        .with_code(EXIT_CHECK_ERRORS));
    }
    if report.repaired() {
        // fsck's "errors corrected": success, said with the exit code.
        return Err(CliError::new("").with_code(EXIT_CHECK_REPAIRED));
    }
    Ok(())
}

fn report_text(label: &str, r: &RepairReport) -> String {
    let mut out = String::new();
    let verb = if r.dry_run { "would fix" } else { "fixed" };
    if r.refused.is_empty() {
        for f in &r.fixes {
            out.push_str(&format!("{verb}: {f}\n"));
        }
    } else {
        for f in &r.fixes {
            out.push_str(&format!("repairable, not repaired: {f}\n"));
        }
    }
    for e in &r.refused {
        out.push_str(&format!("error: {e}\n"));
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let verdict = if !r.refused.is_empty() {
        "not repaired; nothing was written".to_string()
    } else if r.fixes.is_empty() {
        "nothing to repair".to_string()
    } else if r.dry_run {
        format!(
            "{} problem{} can be repaired (dry run: nothing was written; the result was verified in memory)",
            r.fixes.len(),
            if r.fixes.len() == 1 { "" } else { "s" }
        )
    } else {
        let clean = r
            .after
            .as_ref()
            .is_some_and(|a| a.errors.is_empty() && a.warnings.is_empty());
        format!(
            "repaired ({} block{} written); check is {}",
            r.blocks_written,
            if r.blocks_written == 1 { "" } else { "s" },
            if clean { "clean" } else { "NOT clean" }
        )
    };
    out.push_str(&format!("{label}: {verdict}\n"));
    out
}

fn report_json(label: &str, r: &RepairReport) -> Json {
    // Without a result to check (nothing done, or refused) this is false.
    let clean_after = r
        .after
        .as_ref()
        .is_some_and(|a| a.errors.is_empty() && a.warnings.is_empty());
    obj(vec![
        ("pool", label.into()),
        ("dry_run", r.dry_run.into()),
        ("repaired", r.repaired().into()),
        ("fixes", r.fixes.clone().into()),
        ("refused", r.refused.clone().into()),
        ("notes", r.notes.clone().into()),
        ("blocks_written", r.blocks_written.into()),
        ("clean_after", clean_after.into()),
    ])
}
