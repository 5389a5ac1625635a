//! What `pool create` would destroy: like `pvcreate`, `wipefs` and `zpool
//! create`, it names what a file or device already holds and refuses to
//! overwrite it without `--force`. File systems, partition tables, LVM
//! PVs, LUKS and swap are recognised by libblkid (`blkid -p`, low-level
//! probing of the signatures themselves, not the cache); disk images by
//! QEMU's own probe (`qemu-img info`); another thinlun pool by the engine.
//! Anything else that is not zeros at the start or end is still data.

use crate::error::{CliError, CliResult};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

/// Bytes looked at, at each end, for data no probe knows.
const EDGE: u64 = 1 << 20;

/// Refuses a block device that is in use, even with `--force`: the kernel
/// would have two writers.
pub fn check_not_in_use(path: &Path) -> CliResult<()> {
    let is_block = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .map_err(|e| CliError::io(&path.display().to_string(), e))?;
    match device_in_use(path).filter(|_| is_block) {
        Some(why) => Err(CliError::new(format!(
            "{} is in use ({why}); unmount it or stop what holds it first",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// What `path` holds that must not be overwritten without `--force`, if
/// anything. A thinlun pool is left to the engine, which names it.
pub fn existing_content(path: &Path) -> CliResult<Option<String>> {
    if holds_thinlun_pool(path) {
        return Ok(None);
    }
    if let Some(what) = blkid(path) {
        return Ok(Some(what));
    }
    if let Some(what) = disk_image(path) {
        return Ok(Some(what));
    }
    if has_data(path)? {
        return Ok(Some(
            "data that no probe recognises (it is not zeros at its start or end)".into(),
        ));
    }
    Ok(None)
}

/// A block device that is mounted or held open exclusively (by a file
/// system, device-mapper, LVM, md) cannot be opened with O_EXCL.
fn device_in_use(path: &Path) -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Some("mounted, or held by another device or process".into())
        }
        _ => None,
    }
}

/// What libblkid finds: `None` when it finds nothing or is not installed.
fn blkid(path: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None; // 2: nothing found
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    if let Some(pt) = field("PTTYPE") {
        return Some(format!("a partition table ({pt})"));
    }
    let kind = field("TYPE")?;
    Some(match kind.as_str() {
        "LVM2_member" => "an LVM2 physical volume".to_string(),
        "crypto_LUKS" => "a LUKS encrypted volume".to_string(),
        "swap" => "swap space".to_string(),
        _ if field("USAGE").as_deref() == Some("filesystem") => {
            format!("a file system ({kind})")
        }
        _ => format!("a {kind} signature"),
    })
}

/// A disk image QEMU recognises (qcow2, vmdk, vhdx, vdi, ...); raw is none.
fn disk_image(path: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let format = info.get("format")?.as_str()?;
    (!matches!(format, "raw" | "file" | "host_device")).then(|| format!("a {format} disk image"))
}

fn holds_thinlun_pool(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|_| thinlun::has_pool_magic(&magic))
}

fn has_data(path: &Path) -> CliResult<bool> {
    let label = path.display().to_string();
    let mut f = File::open(path).map_err(|e| CliError::io(&label, e))?;
    let len = f
        .seek(SeekFrom::End(0))
        .map_err(|e| CliError::io(&label, e))?;
    let mut buf = vec![0u8; EDGE.min(len) as usize];
    for at in [0, len.saturating_sub(EDGE)] {
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| CliError::io(&label, e))?;
        if buf.iter().any(|&b| b != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}
