//! `check`: verifies a pool without changing it, with fsck's exit codes
//! (0 clean, 4 errors left, 8 the check could not run; `check --repair`
//! runs `repair`, which adds 1 for "repaired").

use super::{pool_path, require_exists, BLOCK};
use crate::error::{emit, CliError, CliResult, EXIT_CHECK_ERRORS, EXIT_CHECK_FAILED};
use crate::human::{pct_str, size, volumes_and_snapshots};
use crate::json::{obj, Json, Render};
use crate::progress::Progress;
use std::path::Path;
use std::time::Duration;
use thinlun::check::CheckReport;
use thinlun::dev::FileDevice;

/// `_read_only` is accepted for scripts that say so explicitly (fsck -n):
/// a check without `--repair` never writes. It opens the LUN read-only and
/// takes no lock, so it needs no write access and runs beside a serving
/// process.
pub fn run(pool: Option<&Path>, _read_only: bool, json: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    let failed = |e: CliError| e.with_code(EXIT_CHECK_FAILED);
    require_exists(path).map_err(failed)?;
    let label = path.display().to_string();
    // The raw device, not Pool::open: a damaged pool must still be
    // readable for the report, and nothing may be written or replayed.
    let dev = FileDevice::open(path, false).map_err(|e| failed(CliError::io(&label, e)))?;
    let report = check_showing_progress(&dev, &label).map_err(failed)?;
    if json {
        emit(&report_json(&label, &report).render())?;
    } else {
        emit(&report_text(&label, &report))?;
    }
    if report.is_clean() {
        return Ok(());
    }
    let n = report.errors.len();
    Err(CliError::new(format!(
        "{label}: check found {n} error{}",
        if n == 1 { "" } else { "s" }
    ))
    .with_code(EXIT_CHECK_ERRORS))
}

/// Runs the check on a worker thread while this one draws a progress bar
/// (volume trees read) when stderr is a terminal.
fn check_showing_progress(dev: &FileDevice, label: &str) -> CliResult<CheckReport> {
    let progress = thinlun::check::Progress::default();
    std::thread::scope(|s| {
        let worker = s.spawn(|| thinlun::check::check_with_progress(dev, label, &progress));
        let mut bar = Progress::new(format!("checking {label}"), |n| format!("{n} volumes"));
        let mut draw = || match progress.get() {
            (_, 0) => {}
            (done, total) => bar.update(done, total),
        };
        while !worker.is_finished() {
            draw();
            std::thread::sleep(Duration::from_millis(50));
        }
        draw();
        bar.finish();
        match worker.join() {
            Ok(r) => r.map_err(CliError::from),
            Err(_) => Err(CliError::new("the check stopped on an internal error")),
        }
    })
}

fn report_text(label: &str, r: &CheckReport) -> String {
    let bs = BLOCK as u64;
    let mut out = String::new();
    // When loading failed the figures are all zero and mean nothing.
    if r.data_blocks > 0 {
        out.push_str(&format!(
            "{label}: {}, {} mapped in {} extent{}; data {} used of {} ({}), {} metadata; {} journal block{} replayed\n",
            volumes_and_snapshots(r.volumes, r.snapshots),
            size(r.mapped_blocks * bs),
            r.extents,
            plural(r.extents),
            size(r.data_blocks.saturating_sub(r.free_blocks) * bs),
            size(r.data_blocks * bs),
            pct_str(r.data_blocks.saturating_sub(r.free_blocks), r.data_blocks),
            size(r.metadata_blocks * bs),
            r.journal_blocks_replayed,
            plural(r.journal_blocks_replayed),
        ));
    }
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for e in &r.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    let verdict = match (r.errors.len(), r.warnings.len()) {
        (0, 0) => "clean".to_string(),
        (0, w) => format!(
            "clean, {w} warning{} (damage that a redundant copy covers; 'thinctl repair' rewrites it)",
            plural(w as u64)
        ),
        (e, _) => format!(
            "{e} error{} found; the pool needs attention ('thinctl repair --dry-run' says what it can fix)",
            plural(e as u64)
        ),
    };
    out.push_str(&format!("{label}: {verdict}\n"));
    out
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn report_json(label: &str, r: &CheckReport) -> Json {
    let bs = BLOCK as u64;
    obj(vec![
        ("pool", label.into()),
        ("clean", r.is_clean().into()),
        ("errors", r.errors.clone().into()),
        ("warnings", r.warnings.clone().into()),
        ("volumes", r.volumes.into()),
        ("snapshots", r.snapshots.into()),
        ("mapped_bytes", (r.mapped_blocks * bs).into()),
        ("extents", r.extents.into()),
        ("data_bytes", (r.data_blocks * bs).into()),
        ("free_bytes", (r.free_blocks * bs).into()),
        ("metadata_bytes", (r.metadata_blocks * bs).into()),
        ("journal_blocks_replayed", r.journal_blocks_replayed.into()),
        (
            "damaged",
            Json::Array(
                r.damaged
                    .iter()
                    .map(|(name, d)| {
                        let mut fields = vec![("volume", name.as_str().into())];
                        fields.extend(super::volume::damage_fields(d));
                        obj(fields)
                    })
                    .collect(),
            ),
        ),
    ])
}
