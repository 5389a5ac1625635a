//! `serve`: a volume to a VM over vhost-user-blk, until SIGTERM/SIGINT.
//! A thin layer over `thinlun-vhost`: open, serve (a [`Daemon`] with one
//! volume and a control socket, so snapshots and more volumes can be asked
//! of it), then flush, close the pool and remove the sockets.

use super::{open_read_only, pool_path, require_exists};
use crate::error::{CliError, CliResult};
use crate::human::size;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thinlun::Pool;
use thinlun_vhost::signals::block_stop_signals;
use thinlun_vhost::{default_control_path, Daemon, Durability, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// Volume to serve
    pub name: String,
    /// vhost-user socket to listen on (replaced if it exists)
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "nbd",
        conflicts_with = "nbd"
    )]
    pub socket: Option<PathBuf>,
    /// Export the volume over NBD on this Unix socket instead; the export
    /// name is the volume name (docs/NBD.md)
    #[arg(long, value_name = "PATH")]
    pub nbd: Option<PathBuf>,
    /// Virtqueues (one worker thread each)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Offer the volume read-only (the pool is opened without writing)
    #[arg(long)]
    pub read_only: bool,
    /// Logical block size the guest sees
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = block_size)]
    pub block_size: u32,
    /// Deprecated: skip persisting completed writes, so that a crash of
    /// this process loses unflushed writes (as a power loss would). It is
    /// no longer faster: persisting costs no device write since the
    /// unflushed record (docs/FORMAT.md, 6.11)
    #[arg(long)]
    pub lazy_commit: bool,
    /// Control socket (snapshots, more volumes) [default: <pool path>.ctl;
    /// none with --read-only]
    #[arg(long, value_name = "PATH", env = "THINLUN_CONTROL")]
    pub control: Option<PathBuf>,
    /// On a shared pool, fail at once when another host holds the volume,
    /// instead of waiting for a silent holder to be proven dead
    #[arg(long)]
    pub no_wait: bool,
    /// Serve the target of a live migration (QEMU's -incoming): answer
    /// the front end at once, but open the volume only when it starts the
    /// rings, once the source's server has released it. Refused for a
    /// volume no server has active (no VM can be migrating from it)
    #[arg(long)]
    pub incoming: bool,
    /// How long the rings' start waits for another server's release
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub incoming_wait: u64,
}

pub fn block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!("'{s}' is not a block size: use 512 or 4096")),
    }
}

/// Opens the pool for writing, waiting up to [`LOCK_WAIT`] for the lock: a
/// server restarted right after a crash can find the pool still locked
/// for a moment, while the kernel tears down the dead process's io_uring
/// (which holds the file, and so its lock).
pub fn open_writable_waiting(path: &Path) -> CliResult<Pool> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut noted = false;
    loop {
        require_exists(path)?;
        match Pool::open_path(path, &super::write_options()) {
            Err(thinlun::Error::Busy { message: msg, .. }) if Instant::now() < deadline => {
                if !noted {
                    eprintln!("thinctl: {msg}; waiting up to {} s", LOCK_WAIT.as_secs());
                    noted = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            r => {
                let pool = r?;
                for w in pool.warnings() {
                    eprintln!("thinctl: warning: {w}");
                }
                return Ok(pool);
            }
        }
    }
}

const LOCK_WAIT: Duration = Duration::from_secs(10);

pub fn run(pool: Option<&std::path::Path>, args: &ServeArgs) -> CliResult<()> {
    // Before any thread exists (the pool starts one), so every thread
    // inherits the mask and only the waiter receives the signal.
    let signals = block_stop_signals().map_err(|e| CliError::io("blocking signals", e))?;
    let path = pool_path(pool)?;
    let pool = if args.read_only {
        open_read_only(path)?
    } else {
        open_writable_waiting(path)?
    };
    pool.set_wait_for_dead_holders(!args.no_wait);
    let info = pool.volume_info(&args.name)?;
    let read_only = args.read_only || info.read_only;
    // A read-only pool is not locked: the control socket belongs to the
    // process writing it, so a read-only server opens one only if told.
    let control = match (&args.control, args.read_only) {
        (Some(c), _) => Some(c.clone()),
        (None, false) => Some(default_control_path(path)),
        (None, true) => None,
    };
    let template = ServeOptions {
        read_only: args.read_only,
        block_size: args.block_size,
        durability: if args.lazy_commit {
            log::warn!(
                "--lazy-commit is deprecated: it is no longer faster, and a crash of this process would lose completed writes"
            );
            Durability::FlushOnly
        } else {
            Durability::ProcessCrash
        },
        activation_wait: Duration::from_secs(args.incoming_wait),
        ..ServeOptions::new(args.socket.as_deref().unwrap_or(Path::new("")), &args.name)
    };
    let mut daemon = Daemon::new(pool, control.as_deref(), template)
        .map_err(|e| CliError::new(format!("serving '{}': {e}", args.name)))?;
    if let Some(sock) = &args.socket {
        let socket = std::path::absolute(sock).unwrap_or_else(|_| sock.clone());
        daemon
            .add(&args.name, &socket, args.queues, args.incoming)
            .map_err(CliError::new)?;
    }
    if let Some(sock) = &args.nbd {
        let socket = std::path::absolute(sock).unwrap_or_else(|_| sock.clone());
        let t = daemon.add_nbd(&args.name, &socket).map_err(CliError::new)?;
        eprintln!("thinctl: {t}");
    }
    signals
        .stop_on_signal(daemon.stop_handle())
        .map_err(|e| CliError::io("starting the signal thread", e))?;
    if let Some(sock) = &args.socket {
        eprintln!(
            "thinctl: serving '{}' ({}{}, {} queue{}, {}-byte blocks) on {}",
            args.name,
            size(info.size_bytes),
            if read_only { ", read-only" } else { "" },
            args.queues,
            if args.queues == 1 { "" } else { "s" },
            args.block_size,
            sock.display()
        );
    }
    run_daemon(daemon)
}

/// Answers the control socket until SIGTERM/SIGINT (the signal thread
/// must be started on the daemon's stop handle), then stops every volume,
/// flushes, closes the pool and removes the sockets. Reports each volume
/// only once the pool is closed cleanly.
pub fn run_daemon(mut daemon: Daemon) -> CliResult<()> {
    if let Some(c) = daemon.control_path() {
        eprintln!("thinctl: control socket {}", c.display());
    }
    let ran = daemon.run();
    let stopped = daemon.shutdown().map_err(CliError::new)?;
    let mut failed = Vec::new();
    for s in &stopped {
        eprintln!(
            "thinctl: stopped serving '{}': {} connection{}, {} requests ({} streamed, {} batches), {} errors",
            s.name,
            s.connections,
            if s.connections == 1 { "" } else { "s" },
            s.stats.requests,
            s.stats.streamed,
            s.stats.batches,
            s.stats.errors
        );
        if let Some(e) = &s.error {
            failed.push(format!("serving '{}': {e}", s.name));
        }
    }
    ran.map_err(|e| CliError::io("control socket", e))?;
    match failed.is_empty() {
        true => Ok(()),
        false => Err(CliError::new(failed.join("; "))),
    }
}
