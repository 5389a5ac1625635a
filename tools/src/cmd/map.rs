//! `map` / `unmap`: a volume as a local block device (/dev/nbdN) through
//! the kernel's NBD client, for host-side tools (mkfs, backup agents,
//! containers). The volume is exported on the serving process's NBD
//! socket, and `nbd-client` attaches the kernel to it.

use super::daemon::{ask, control_of};
use super::pool_path;
use crate::error::{CliError, CliResult};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Command;
use thinlun_vhost::control::Request;

#[derive(Args)]
pub struct MapArgs {
    /// Volume (or VOL@SNAP, always read-only) to map
    pub name: String,
    /// Map read-only
    #[arg(long)]
    pub read_only: bool,
    /// The serving process's NBD socket [default: <pool path>.nbd]
    #[arg(long, value_name = "PATH")]
    pub nbd: Option<PathBuf>,
    /// Control socket of the serving process [default: <pool path>.ctl]
    #[arg(long, value_name = "PATH", env = "THINLUN_CONTROL")]
    pub control: Option<PathBuf>,
    /// Device to attach [default: the first free /dev/nbdN]
    #[arg(long, value_name = "DEV")]
    pub device: Option<PathBuf>,
}

#[derive(Args)]
pub struct UnmapArgs {
    /// Device to detach (/dev/nbdN)
    pub device: PathBuf,
}

/// The kernel must have its NBD client: a clear error where it has not.
fn require_kernel_nbd() -> CliResult<()> {
    if Path::new("/sys/module/nbd").exists() {
        return Ok(());
    }
    let tried = Command::new("modprobe").arg("nbd").output();
    if Path::new("/sys/module/nbd").exists() {
        return Ok(());
    }
    let why = match tried {
        Ok(o) if !o.status.success() => {
            let e = String::from_utf8_lossy(&o.stderr);
            format!(
                "modprobe nbd failed: {}",
                e.lines().next().unwrap_or("").trim()
            )
        }
        Ok(_) => "modprobe nbd loaded nothing".to_string(),
        Err(e) => format!("modprobe: {e}"),
    };
    Err(CliError::new(format!(
        "the kernel has no NBD client (no /sys/module/nbd; {why}): install the nbd module, or attach the volume from QEMU with -blockdev driver=nbd (docs/NBD.md)"
    )))
}

fn require_nbd_client() -> CliResult<()> {
    match Command::new("nbd-client").arg("--help").output() {
        Ok(_) => Ok(()),
        Err(_) => Err(CliError::new(
            "mapping needs nbd-client (Debian: apt-get install nbd-client)",
        )),
    }
}

/// The first /dev/nbdN the kernel is not using.
fn free_device() -> CliResult<PathBuf> {
    for n in 0..256 {
        let sys = PathBuf::from(format!("/sys/block/nbd{n}"));
        if !sys.exists() {
            break;
        }
        let pid = std::fs::read_to_string(sys.join("pid")).unwrap_or_default();
        if pid.trim().is_empty() {
            return Ok(PathBuf::from(format!("/dev/nbd{n}")));
        }
    }
    Err(CliError::new(
        "no free /dev/nbdN device (modprobe nbd nbds_max=N)",
    ))
}

pub fn map(pool: Option<&Path>, args: &MapArgs) -> CliResult<()> {
    require_kernel_nbd()?;
    require_nbd_client()?;
    let control = control_of(pool, args.control.as_deref())?;
    let socket = match &args.nbd {
        Some(s) => std::path::absolute(s).map_err(|e| CliError::io(&s.display().to_string(), e))?,
        None => {
            let mut p = pool_path(pool)?.as_os_str().to_owned();
            p.push(".nbd");
            std::path::absolute(PathBuf::from(p)).map_err(|e| CliError::io("the pool path", e))?
        }
    };
    let device = match &args.device {
        Some(d) => d.clone(),
        None => free_device()?,
    };
    // Already exported (by an earlier map) is fine.
    let req = Request::AddNbd {
        name: args.name.clone(),
        socket: socket.clone(),
    };
    if let Err(e) = ask(&control, &req) {
        if !e.to_string().contains("already exported") {
            return Err(e);
        }
    }
    let mut cmd = Command::new("nbd-client");
    cmd.arg("-unix")
        .arg(&socket)
        .arg(&device)
        .args(["-name", &args.name]);
    if args.read_only {
        cmd.arg("-readonly");
    }
    let out = cmd
        .output()
        .map_err(|e| CliError::io("running nbd-client", e))?;
    if !out.status.success() {
        return Err(CliError::new(format!(
            "nbd-client: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    println!("{}", device.display());
    Ok(())
}

pub fn unmap(args: &UnmapArgs) -> CliResult<()> {
    require_kernel_nbd()?;
    require_nbd_client()?;
    let out = Command::new("nbd-client")
        .arg("-d")
        .arg(&args.device)
        .output()
        .map_err(|e| CliError::io("running nbd-client", e))?;
    if !out.status.success() {
        return Err(CliError::new(format!(
            "nbd-client -d: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
