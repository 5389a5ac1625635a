//! `du`: exact space use per volume and snapshot (provisioned, mapped,
//! exclusive, shared), as thin_ls and `rbd du` show it, plus pool totals.

use super::volume::{indented_name, tree_order};
use super::{open_read_only, pool_path, with_pool};
use crate::error::{emit, CliError, CliResult};
use crate::human::size;
use crate::json::{obj, Json, Render};
use crate::table::{fields, OutputArgs, Table};
use std::path::Path;
use thinlun::{PoolStatus, Usage, VolumeInfo};

/// Pool-wide figures.
struct Totals {
    data_used: u64,
    metadata: u64,
    pending_free: u64,
    /// Sum of every volume's and snapshot's exclusive bytes.
    exclusive: u64,
    /// Data held by more than one volume, counted once.
    shared: u64,
}

fn totals(status: &PoolStatus, usage: &[Usage]) -> Totals {
    let exclusive: u64 = usage.iter().map(|u| u.exclusive_bytes).sum();
    // Data in use is what volumes reference (each block once), metadata,
    // and frees not yet reusable; what is referenced but nobody's alone is
    // shared.
    let referenced = status
        .data_used_bytes
        .saturating_sub(status.metadata_used_bytes)
        .saturating_sub(status.pending_free_bytes);
    Totals {
        data_used: status.data_used_bytes,
        metadata: status.metadata_used_bytes,
        pending_free: status.pending_free_bytes,
        exclusive,
        shared: referenced.saturating_sub(exclusive),
    }
}

pub fn run(pool: Option<&Path>, name: Option<&str>, out: &OutputArgs, json: bool) -> CliResult<()> {
    let pool = open_read_only(pool_path(pool)?)?;
    let (vols, usage, status) = with_pool(pool, |p| {
        if let Some(n) = name {
            p.volume_info(n)?;
        }
        Ok((p.volumes(), p.usage(), p.status()))
    })?;
    let totals = totals(&status, &usage);
    let rows: Vec<(VolumeInfo, &Usage)> = tree_order(vols)
        .into_iter()
        .filter(|v| match name {
            None => true,
            Some(n) => v.name == n || v.snapshot_of.as_deref() == Some(n),
        })
        .map(|v| {
            let u = usage
                .iter()
                .find(|u| u.name == v.name)
                .ok_or_else(|| CliError::new(format!("no usage figures for '{}'", v.name)))?;
            Ok((v, u))
        })
        .collect::<CliResult<_>>()?;
    if json {
        return emit(&to_json(&rows, &totals).render());
    }
    let mut t = Table::new(&[
        ("NAME", false),
        ("PROVISIONED", true),
        ("MAPPED", true),
        ("EXCLUSIVE", true),
        ("SHARED", true),
    ]);
    for (v, u) in &rows {
        t.row(vec![
            if out.scripted {
                v.name.clone()
            } else {
                indented_name(v)
            },
            out.size(u.provisioned_bytes),
            out.size(u.mapped_bytes),
            out.size(u.exclusive_bytes),
            out.size(u.shared_bytes),
        ]);
    }
    let table = t.render_as(out)?;
    // Scripts get the rows alone; the pool totals are in --json.
    if out.scripted || out.fields.is_some() {
        return emit(&table);
    }
    let with_bytes = |b: u64| {
        if out.bytes {
            b.to_string()
        } else {
            format!("{} ({b} bytes)", size(b))
        }
    };
    let mut text = table;
    text.push('\n');
    text.push_str(&fields(&[
        ("pool data used", with_bytes(totals.data_used)),
        ("  metadata", with_bytes(totals.metadata)),
        ("  awaiting reuse", with_bytes(totals.pending_free)),
        ("  exclusive (sum)", with_bytes(totals.exclusive)),
        ("  shared", with_bytes(totals.shared)),
    ]));
    emit(&text)
}

fn to_json(rows: &[(VolumeInfo, &Usage)], t: &Totals) -> Json {
    let vols = rows
        .iter()
        .map(|(v, u)| {
            let mut f = vec![
                ("name", u.name.as_str().into()),
                ("snapshot", v.snapshot.into()),
                ("provisioned_bytes", u.provisioned_bytes.into()),
                ("mapped_bytes", u.mapped_bytes.into()),
                ("exclusive_bytes", u.exclusive_bytes.into()),
                ("shared_bytes", u.shared_bytes.into()),
            ];
            if let Some(s) = &v.snapshot_of {
                f.push(("snapshot_of", s.as_str().into()));
            }
            obj(f)
        })
        .collect();
    obj(vec![
        ("volumes", Json::Array(vols)),
        (
            "pool",
            obj(vec![
                ("data_used_bytes", t.data_used.into()),
                ("metadata_bytes", t.metadata.into()),
                ("pending_free_bytes", t.pending_free.into()),
                ("exclusive_bytes", t.exclusive.into()),
                ("shared_bytes", t.shared.into()),
            ]),
        ),
    ])
}
