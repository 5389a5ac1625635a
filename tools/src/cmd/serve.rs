//! `serve`: a volume to a VM over vhost-user-blk, until SIGTERM/SIGINT.
//! A thin layer over `thinlun-vhost`: open, serve, then flush, close the
//! pool and remove the socket.

use super::{open_read_only, pool_path, require_exists, with_pool};
use crate::error::{CliError, CliResult};
use crate::human::size;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlun::{OpenOptions, Pool};
use thinlun_vhost::signals::block_stop_signals;
use thinlun_vhost::{default_serial, Durability, ServeOptions, Server};

#[derive(Args)]
pub struct ServeArgs {
    /// Volume to serve
    pub name: String,
    /// vhost-user socket to listen on (replaced if it exists)
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
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
    /// Commit metadata only on guest FLUSH: faster, but a crash of this
    /// process then loses unflushed writes (as a power loss would)
    #[arg(long)]
    pub lazy_commit: bool,
}

fn block_size(s: &str) -> Result<u32, String> {
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
fn open_writable_waiting(path: &Path) -> CliResult<Pool> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut noted = false;
    loop {
        require_exists(path)?;
        match Pool::open_path(path, &OpenOptions::default()) {
            Err(thinlun::Error::Busy(msg)) if Instant::now() < deadline => {
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
    let info = pool.volume_info(&args.name)?;
    let read_only = args.read_only || info.read_only;
    let vol = Arc::new(pool.open_volume(&args.name)?);
    let opts = ServeOptions {
        num_queues: args.queues,
        read_only,
        block_size: args.block_size,
        opt_io_bytes: pool.status().chunk_bytes,
        durability: if args.lazy_commit {
            Durability::FlushOnly
        } else {
            Durability::ProcessCrash
        },
        ..ServeOptions::new(&args.socket, &default_serial(&info.name, info.id))
    };
    let name = args.name.clone();
    let (stats, connections) = with_pool(pool, move |_| {
        let mut server = Server::new(vol.clone(), &opts)
            .map_err(|e| CliError::new(format!("serving '{}': {e}", args.name)))?;
        signals
            .stop_on_signal(server.stop_handle())
            .map_err(|e| CliError::io("starting the signal thread", e))?;
        eprintln!(
            "thinctl: serving '{}' ({}{}, {} queue{}, {}-byte blocks) on {}",
            args.name,
            size(info.size_bytes),
            if read_only { ", read-only" } else { "" },
            args.queues,
            if args.queues == 1 { "" } else { "s" },
            args.block_size,
            args.socket.display()
        );
        let served = server.run();
        let stats = server.stats();
        let connections = server.connections();
        // Dropping the server removes the socket.
        drop(server);
        let flushed = if read_only { Ok(()) } else { vol.flush() };
        drop(vol);
        served.map_err(|e| CliError::new(format!("serving '{}': {e}", args.name)))?;
        flushed?;
        Ok((stats, connections))
    })?;
    // Only once the pool is closed cleanly.
    eprintln!(
        "thinctl: stopped serving '{name}': {connections} connection{}, {} requests in {} batches, {} errors",
        if connections == 1 { "" } else { "s" },
        stats.requests,
        stats.batches,
        stats.errors
    );
    Ok(())
}
