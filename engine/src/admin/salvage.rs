//! `repair --salvage VOL`: rebuilds a damaged volume's tree from what is
//! still readable (docs/FORMAT.md 5.1). The range the unreadable node
//! covered reads as zeros afterwards; nothing else of the volume changes.
//!
//! Never implicit: it gives up data (whatever the lost node mapped), so the
//! admin names each volume. A node shared by a volume and its snapshots or
//! clones is salvaged only in the trees named: a snapshot is a point in
//! time someone may prefer to restore from elsewhere, so salvage never
//! changes a volume nobody asked for; the report lists who still holds it.
//!
//! Like `repair`, the work happens on an in-memory overlay: the pool is
//! opened there, the named volumes lose their damage marks, and the normal
//! checkpoint writes their new trees (copy-on-write: the readable leaves
//! as they are, new interior nodes) and then their headers, so the LUN
//! holds either the old damaged tree or the new one at every point. The
//! result is verified before anything reaches the LUN: `check` must report
//! no problem but the damage of volumes not named, and every volume must
//! map exactly what it mapped before (the salvaged ones outside their lost
//! ranges, which they never mapped in memory anyway).

use crate::admin::check::{check, CheckReport};
use crate::dev::{write_blocks, BlockDevice, OverlayDevice};
use crate::error::{Error, Result};
use crate::format::node::Extent;
use crate::format::BLOCK_SIZE;
use crate::format::SINGLE_HOST_ID;
use crate::load::{load, Loaded};
use crate::pool::{DamagedRange, OpenOptions, Pool};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One volume salvage rebuilt (or would rebuild, on a dry run).
#[derive(Clone, Debug)]
pub struct Salvaged {
    /// Display name (`vol@snap` for a snapshot).
    pub volume: String,
    /// What it lost: these ranges read as zeros from now on.
    pub lost: Vec<DamagedRange>,
    /// Data blocks its header counted beyond what the readable part maps:
    /// what the lost part mapped. The ones no other tree uses are free.
    pub lost_blocks: u64,
    /// Other volumes whose trees hold one of the same unreadable nodes:
    /// they stay damaged until salvaged themselves.
    pub shared_with: Vec<String>,
}

/// What `salvage` did.
#[derive(Clone, Debug, Default)]
pub struct SalvageReport {
    /// The volumes rebuilt, with what each lost.
    pub salvaged: Vec<Salvaged>,
    /// Why nothing was written; empty when salvage went ahead.
    pub refused: Vec<String>,
    /// Facts for the admin that need no action.
    pub notes: Vec<String>,
    /// Nothing was written: the report says what salvage would do.
    pub dry_run: bool,
    /// Blocks written to the LUN (0 on a dry run or when refused).
    pub blocks_written: u64,
    /// `check` of the result (of the LUN, or the overlay on a dry run).
    pub after: Option<CheckReport>,
}

/// Salvages the volumes `names` (display names) of the pool on `dev`,
/// which the caller holds exclusively. `Err` only when the LUN cannot be
/// read or holds no pool; refusals are in the report, with nothing written.
pub fn salvage(
    dev: Arc<dyn BlockDevice>,
    label: &str,
    names: &[String],
    dry_run: bool,
) -> Result<SalvageReport> {
    let mut report = SalvageReport {
        dry_run,
        ..Default::default()
    };
    let sb = crate::load::read_superblock(dev.as_ref(), label, &mut Vec::new());
    if sb.is_ok_and(|sb| sb.shared.is_some()) {
        report.refused.push(
            "this pool is shared by several hosts: salvage supports single-host pools only".into(),
        );
        return Ok(report);
    }
    if names.is_empty() {
        report.refused.push("no volume named to salvage".into());
        return Ok(report);
    }
    let before = check(dev.as_ref(), label)?;
    // Every damaged range is one error; anything else needs more than a
    // salvage, and a salvage on top of it would build on a guess.
    let other: Vec<&String> = before
        .errors
        .iter()
        .filter(|e| !before.damaged.iter().any(|(n, _)| is_damage_error(e, n)))
        .collect();
    if !other.is_empty() || before.errors.len() != before.damaged.len() {
        report.refused = before.errors.clone();
        report.notes.push(
            "nothing was written: the pool has damage other than unreadable mapping nodes, which salvage does not handle".into(),
        );
        return Ok(report);
    }
    let old = load(dev.as_ref(), label, SINGLE_HOST_ID, crate::util::boot_id())?;
    let mut ids = Vec::new();
    for name in names {
        let Some(v) = old.state.volume_by_name(name) else {
            report.refused.push(format!("no volume '{name}'"));
            continue;
        };
        if v.damage.is_empty() {
            report.refused.push(format!(
                "volume '{name}' is not damaged: there is nothing to salvage"
            ));
            continue;
        }
        if !ids.contains(&v.rec.id) {
            ids.push(v.rec.id);
        }
    }
    if !report.refused.is_empty() {
        report.notes.push("nothing was written".into());
        return Ok(report);
    }
    for &id in &ids {
        let st = &old.state;
        let Some(v) = st.volumes.get(&id) else {
            continue; // ids come from this state
        };
        let nodes: Vec<u64> = v.damage.iter().map(|d| d.node).collect();
        let shared_with = st
            .volumes
            .values()
            .filter(|o| !ids.contains(&o.rec.id))
            .filter(|o| o.damage.iter().any(|d| nodes.contains(&d.node)))
            .map(|o| st.display_name(o))
            .collect();
        report.salvaged.push(Salvaged {
            volume: st.display_name(v),
            lost: crate::map::state::damaged_ranges(v),
            lost_blocks: v.header.mapped_blocks.saturating_sub(v.map.mapped_blocks()),
            shared_with,
        });
    }

    let ov = Arc::new(OverlayDevice::new(dev.clone()));
    let io = |e| Error::io(format!("{label}: salvaging"), e);
    let pool = Pool::open(ov.clone(), label, &OpenOptions::default())?;
    let done = ids.iter().try_for_each(|&id| salvage_in(&pool, id));
    let closed = pool.close();
    done?;
    closed?;
    // A torn block at the journal's end (an interrupted commit) is cleared
    // as repair clears it: plain repair refuses a damaged pool, so salvage
    // must not leave it either. The journal starts past it now.
    let reopened = load(ov.as_ref(), label, SINGLE_HOST_ID, crate::util::boot_id())?;
    let layout = reopened.state.sb.layout;
    if let Some(at) = crate::admin::check::torn_tail(ov.as_ref(), &layout, reopened.tail)? {
        write_blocks(ov.as_ref(), &[(at, vec![0u8; BLOCK_SIZE])]).map_err(io)?;
        ov.flush().map_err(io)?;
        report.notes.push(format!(
            "journal: block {at} at its end was torn (an interrupted commit): its changes stay unapplied, as after a power loss during that commit, and the block is cleared"
        ));
    }
    drop(reopened);
    let after = check(ov.as_ref(), label)?;
    let new = load(ov.as_ref(), label, SINGLE_HOST_ID, crate::util::boot_id())?;
    let problems = verify(&old, &new, &ids, &before, &after);
    if !problems.is_empty() {
        report.refused = problems;
        report
            .notes
            .push("nothing was written: the salvaged metadata did not verify".into());
        return Ok(report);
    }
    drop((old, new));
    if after.errors.is_empty() {
        report.notes.push(
            "no damaged tree is left: free space is rebuilt from the readable trees at every open, so the blocks only the lost parts mapped are free again".into(),
        );
    } else {
        report.notes.push(format!(
            "{} damaged range{} of volumes not named stay{}: their lost blocks stay withheld from the free space until they are salvaged too",
            after.damaged.len(),
            if after.damaged.len() == 1 { "" } else { "s" },
            if after.damaged.len() == 1 { "s" } else { "" },
        ));
    }
    if dry_run {
        report.after = Some(after);
        return Ok(report);
    }
    report.blocks_written = ov.apply().map_err(io)?;
    report.after = Some(check(dev.as_ref(), label)?);
    log::warn!(
        "{label}: salvaged {}: the lost ranges now read as zeros",
        report
            .salvaged
            .iter()
            .map(|s| format!("'{}'", s.volume))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(report)
}

/// Whether `e` is the check error for a damaged range of volume `name`.
fn is_damage_error(e: &str, name: &str) -> bool {
    e.starts_with(&format!("volume '{name}' is damaged: "))
}

/// Clears volume `id`'s damage in the open pool and checkpoints its tree.
/// The map in memory already is the readable part, with the journal's
/// changes outside the lost ranges applied; changes inside them are
/// dropped with what the lost node mapped (the range reads as zeros).
fn salvage_in(pool: &Pool, id: u64) -> Result<()> {
    let inner = &pool.inner;
    inner.writable()?;
    let mut guard = inner.commit.lock();
    let ctl = guard.as_mut().ok_or(Error::PoolReadOnly)?;
    inner.commit_locked(ctl)?;
    {
        let mut st = inner.state.lock();
        let v = st
            .volumes
            .get_mut(&id)
            .ok_or_else(|| Error::NoSuchVolume(format!("id {id}")))?;
        v.damage.clear();
        v.map.rekey_first_leaf();
        // The new tree is written even when nothing was replayed for it.
        v.map.set_dirty();
        // Its entries are in the map now (or lost with the range); the
        // checkpoint's header records the journal position past them.
        st.carried.retain(|e| e.volume() != id);
        let damaged = st.is_damaged();
        inner.damaged.store(damaged, Ordering::Release);
    }
    inner.checkpoint_locked(ctl)
}

/// A volume's mapping as runs of (vblock, pblock, len, flags), adjacent
/// runs merged, so two trees that map the same are equal however their
/// leaves split it.
fn runs(l: &Loaded, id: u64) -> Vec<(u64, u64, u64, u8)> {
    let mut out: Vec<(u64, u64, u64, u8)> = Vec::new();
    if let Some(v) = l.state.volumes.get(&id) {
        v.map.for_each(|e: &Extent| {
            let len = e.len as u64;
            match out.last_mut() {
                Some(r)
                    if r.0 + r.2 == e.vblock
                        && r.3 == e.flags
                        && (e.is_zero() || r.1 + r.2 == e.pblock) =>
                {
                    r.2 += len
                }
                _ => out.push((
                    e.vblock,
                    if e.is_zero() { 0 } else { e.pblock },
                    len,
                    e.flags,
                )),
            }
        });
    }
    out
}

/// What is wrong with the salvaged state `new`, compared with `old`.
fn verify(
    old: &Loaded,
    new: &Loaded,
    ids: &[u64],
    before: &CheckReport,
    after: &CheckReport,
) -> Vec<String> {
    let mut problems: Vec<String> = after
        .warnings
        .iter()
        .map(|w| format!("after salvage, check warns: {w}"))
        .collect();
    // The damage left must be exactly that of the volumes not named.
    let left: BTreeMap<&str, Vec<&DamagedRange>> =
        after.damaged.iter().fold(BTreeMap::new(), |mut m, (n, d)| {
            m.entry(n.as_str()).or_default().push(d);
            m
        });
    let named: Vec<String> = ids
        .iter()
        .filter_map(|id| old.state.volumes.get(id))
        .map(|v| old.state.display_name(v))
        .collect();
    let expect: BTreeMap<&str, Vec<&DamagedRange>> = before
        .damaged
        .iter()
        .filter(|(n, _)| !named.contains(n))
        .fold(BTreeMap::new(), |mut m, (n, d)| {
            m.entry(n.as_str()).or_default().push(d);
            m
        });
    if left != expect {
        problems.push(format!(
            "after salvage, the damage left is {left:?}, expected {expect:?}"
        ));
    }
    for e in &after.errors {
        if !after.damaged.iter().any(|(n, _)| is_damage_error(e, n)) {
            problems.push(format!("after salvage, check reports: {e}"));
        }
    }
    if old.state.volumes.len() != new.state.volumes.len() {
        problems.push("after salvage, the catalog lists other volumes".into());
    }
    for (&id, v) in &old.state.volumes {
        let name = old.state.display_name(v);
        match new.state.volumes.get(&id) {
            Some(n) if n.rec == v.rec => {}
            _ => {
                problems.push(format!("after salvage, volume '{name}' is not as before"));
                continue;
            }
        }
        if runs(old, id) != runs(new, id) {
            problems.push(format!(
                "after salvage, volume '{name}' maps other blocks than before"
            ));
        }
    }
    problems
}
