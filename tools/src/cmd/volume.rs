//! Volume life cycle: create, list, info, resize, rename, remove.

use super::{open_read_only, open_read_write, pool_path, with_pool};
use crate::error::{emit, CliResult};
use crate::human::{pct, pct_str, size, utc};
use crate::json::Json;
use crate::table::{fields, Table};
use std::path::Path;
use thinlun::VolumeInfo;

pub fn create(pool: Option<&Path>, name: &str, bytes: u64) -> CliResult<()> {
    let pool = open_read_write(pool_path(pool)?)?;
    let info = with_pool(pool, |p| Ok(p.create_volume(name, bytes)?))?;
    emit(&format!(
        "created volume '{}' ({}, {} bytes)\n",
        info.name,
        size(info.size_bytes),
        info.size_bytes
    ))
}

pub fn list(pool: Option<&Path>, json: bool) -> CliResult<()> {
    let pool = open_read_only(pool_path(pool)?)?;
    let vols = with_pool(pool, |p| Ok(p.volumes()))?;
    if json {
        let items: Vec<Json> = vols.iter().map(info_json).collect();
        return emit(&Json::Array(items).render());
    }
    let mut t = Table::new(&[
        ("NAME", false),
        ("SIZE", true),
        ("MAPPED", true),
        ("USE%", true),
        ("EXTENTS", true),
        ("FLAGS", false),
    ]);
    for v in &vols {
        t.row(vec![
            v.name.clone(),
            size(v.size_bytes),
            size(v.mapped_bytes),
            pct_str(v.mapped_bytes, v.size_bytes),
            v.extents.to_string(),
            flags(v),
        ]);
    }
    emit(&t.render())
}

pub fn info(pool: Option<&Path>, name: &str, json: bool) -> CliResult<()> {
    let pool = open_read_only(pool_path(pool)?)?;
    let v = with_pool(pool, |p| Ok(p.volume_info(name)?))?;
    if json {
        return emit(&info_json(&v).render());
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    emit(&fields(&[
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        (
            "size",
            format!("{} ({} bytes)", size(v.size_bytes), v.size_bytes),
        ),
        (
            "mapped",
            format!(
                "{} ({} bytes, {} of the size)",
                size(v.mapped_bytes),
                v.mapped_bytes,
                pct_str(v.mapped_bytes, v.size_bytes)
            ),
        ),
        ("extents", v.extents.to_string()),
        ("read-only", yes_no(v.read_only)),
        ("snapshot", yes_no(v.snapshot)),
        ("base", yes_no(v.base)),
        (
            "created",
            format!("{} ({})", utc(v.created_unix), v.created_unix),
        ),
    ]))
}

pub fn resize(pool: Option<&Path>, name: &str, bytes: u64, force: bool) -> CliResult<()> {
    let pool = open_read_write(pool_path(pool)?)?;
    let (old, new) = with_pool(pool, |p| {
        let old = p.volume_info(name)?.size_bytes;
        Ok((old, p.resize_volume(name, bytes, force)?))
    })?;
    emit(&format!(
        "resized volume '{name}' from {} to {} ({} bytes)\n",
        size(old),
        size(new.size_bytes),
        new.size_bytes
    ))
}

pub fn rename(pool: Option<&Path>, old: &str, new: &str) -> CliResult<()> {
    let pool = open_read_write(pool_path(pool)?)?;
    with_pool(pool, |p| Ok(p.rename_volume(old, new)?))?;
    emit(&format!("renamed volume '{old}' to '{new}'\n"))
}

pub fn remove(pool: Option<&Path>, name: &str) -> CliResult<()> {
    let pool = open_read_write(pool_path(pool)?)?;
    with_pool(pool, |p| Ok(p.remove_volume(name, false)?))?;
    emit(&format!("removed volume '{name}'\n"))
}

fn flags(v: &VolumeInfo) -> String {
    let set: Vec<&str> = [(v.read_only, "ro"), (v.snapshot, "snap"), (v.base, "base")]
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

fn info_json(v: &VolumeInfo) -> Json {
    Json::Object(vec![
        ("name", v.name.as_str().into()),
        ("id", v.id.into()),
        ("size_bytes", v.size_bytes.into()),
        ("mapped_bytes", v.mapped_bytes.into()),
        ("mapped_pct", pct(v.mapped_bytes, v.size_bytes).into()),
        ("extents", v.extents.into()),
        ("read_only", v.read_only.into()),
        ("snapshot", v.snapshot.into()),
        ("base", v.base.into()),
        ("created_unix", v.created_unix.into()),
    ])
}
