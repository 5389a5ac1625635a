//! `daemon`: serve many volumes of one pool from one process, added and
//! removed at run time (`serve-add`, `serve-remove`) through its control
//! socket; and the client side of that socket, which the commands that
//! change the pool (`snapshot`, `create`, `resize`, `remove`, ...) use when
//! the pool is held by a serving process.

use super::pool_path;
use super::serve::{block_size, open_writable_waiting, run_daemon};
use crate::error::{emit, CliError, CliResult};
use crate::human::size;
use clap::Args;
use std::path::{Path, PathBuf};
use thinlun_vhost::control::{request, Answer, Request};
use thinlun_vhost::signals::block_stop_signals;
use thinlun_vhost::{default_control_path, Daemon, Durability, ServeOptions};

#[derive(Args)]
pub struct DaemonArgs {
    /// Control socket [default: <pool path>.ctl]
    #[arg(long, value_name = "PATH", env = "THINLUN_CONTROL")]
    pub control: Option<PathBuf>,
    /// Logical block size the guests see
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = block_size)]
    pub block_size: u32,
    /// Deprecated, no longer faster (see 'serve --help')
    #[arg(long)]
    pub lazy_commit: bool,
}

#[derive(Args)]
pub struct ServeAddArgs {
    /// Volume to serve
    pub name: String,
    /// vhost-user socket to listen on (replaced if it is a stale socket)
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "nbd",
        conflicts_with = "nbd"
    )]
    pub socket: Option<PathBuf>,
    /// Export over NBD instead, on the daemon's NBD socket (it listens on
    /// PATH from the first export)
    #[arg(long, value_name = "PATH")]
    pub nbd: Option<PathBuf>,
    /// Virtqueues (one worker thread each)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Control socket of the daemon [default: <pool path>.ctl]
    #[arg(long, value_name = "PATH", env = "THINLUN_CONTROL")]
    pub control: Option<PathBuf>,
    /// Serve the target of a live migration (see 'serve --help')
    #[arg(long)]
    pub incoming: bool,
}

#[derive(Args)]
pub struct ServeRemoveArgs {
    /// Volume to stop serving
    pub name: String,
    /// Stop only the server on this socket (the source of a migration
    /// between two QEMU processes of this host) [default: all of VOL's]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Control socket of the daemon [default: <pool path>.ctl]
    #[arg(long, value_name = "PATH", env = "THINLUN_CONTROL")]
    pub control: Option<PathBuf>,
}

pub fn run(pool: Option<&Path>, args: &DaemonArgs) -> CliResult<()> {
    // Before any thread exists (see serve).
    let signals = block_stop_signals().map_err(|e| CliError::io("blocking signals", e))?;
    let path = pool_path(pool)?;
    let pool = open_writable_waiting(path)?;
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_path(path));
    let template = ServeOptions {
        block_size: args.block_size,
        durability: if args.lazy_commit {
            log::warn!(
                "--lazy-commit is deprecated: it is no longer faster, and a crash of this process would lose completed writes"
            );
            Durability::FlushOnly
        } else {
            Durability::ProcessCrash
        },
        ..ServeOptions::new(Path::new(""), "")
    };
    let daemon = Daemon::new(pool, Some(&control), template)
        .map_err(|e| CliError::new(format!("starting the daemon: {e}")))?;
    signals
        .stop_on_signal(daemon.stop_handle())
        .map_err(|e| CliError::io("starting the signal thread", e))?;
    eprintln!("thinctl: daemon for {} ready", path.display());
    run_daemon(daemon)
}

/// The control socket to talk to: the one given, or the pool's.
pub fn control_of(pool: Option<&Path>, given: Option<&Path>) -> CliResult<PathBuf> {
    match given {
        Some(c) => Ok(c.to_path_buf()),
        None => Ok(default_control_path(pool_path(pool)?)),
    }
}

/// One word of a request line: no blanks, no line breaks.
/// Sends `req`; the daemon's answer, or its error as ours.
pub fn ask(control: &Path, req: &Request) -> CliResult<Answer> {
    match request(control, req) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(t)) => Err(CliError::new(t)),
        Err(e) => Err(CliError::new(format!(
            "no daemon answers on {} ({e}); start one with 'thinctl daemon' or 'thinctl serve'",
            control.display()
        ))),
    }
}

/// A path as the daemon must see it: its working directory is not ours.
fn absolute(p: &Path) -> CliResult<PathBuf> {
    std::path::absolute(p).map_err(|e| CliError::io(&p.display().to_string(), e))
}

pub fn add(pool: Option<&Path>, args: &ServeAddArgs) -> CliResult<()> {
    let control = control_of(pool, args.control.as_deref())?;
    let req = match (&args.socket, &args.nbd) {
        (_, Some(nbd)) => Request::AddNbd {
            name: args.name.clone(),
            socket: absolute(nbd)?,
        },
        (Some(sock), None) => Request::Add {
            name: args.name.clone(),
            socket: absolute(sock)?,
            queues: args.queues,
            incoming: args.incoming,
        },
        (None, None) => return Err(CliError::new("give --socket or --nbd")),
    };
    match ask(&control, &req)? {
        Answer::Serving { message } => emit(&format!("{message}\n")),
        other => Err(unexpected(&other)),
    }
}

pub fn remove(pool: Option<&Path>, args: &ServeRemoveArgs) -> CliResult<()> {
    let control = control_of(pool, args.control.as_deref())?;
    let req = Request::Remove {
        name: args.name.clone(),
        socket: args.socket.as_deref().map(absolute).transpose()?,
    };
    match ask(&control, &req)? {
        Answer::Stopped { summaries } => emit(&format!("{}\n", summaries.join("; "))),
        other => Err(unexpected(&other)),
    }
}

/// The control socket of the process holding `pool` (`busy` is why it
/// could not be opened): `given`, else `THINLUN_CONTROL`, else the pool's
/// default; an error if no socket is there.
pub fn serving_control(pool: &Path, given: Option<&Path>, busy: &str) -> CliResult<PathBuf> {
    let control = match (given, std::env::var_os("THINLUN_CONTROL")) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(c)) if !c.is_empty() => PathBuf::from(c),
        (None, _) => default_control_path(pool),
    };
    if !control.exists() {
        return Err(CliError::new(format!(
            "{busy} (and it has no control socket at {})",
            control.display()
        )));
    }
    Ok(control)
}

/// An answer of another kind than the request's (another version's
/// daemon): the change was made, only its report is lost.
pub fn unexpected(answer: &Answer) -> CliError {
    CliError::new(format!(
        "the serving process did it but answered {answer:?}, which this thinctl does not expect"
    ))
}

/// `pool grow` for a pool another process serves: that process grows it.
pub fn grow_via_control(pool: &Path, busy: &str) -> CliResult<()> {
    let control = serving_control(pool, None, busy)?;
    let bytes = match ask(&control, &Request::Grow {})? {
        Answer::Grown { size_bytes } => size_bytes,
        other => return Err(unexpected(&other)),
    };
    emit(&format!(
        "pool grown to {} ({bytes} bytes) by the process serving it (control socket {})\n",
        size(bytes),
        control.display()
    ))
}

/// `snapshot VOL@SNAP` for a pool another process holds (`busy` is why it
/// could not be opened): asks that process through its control socket.
pub fn snapshot_via_control(
    pool: &Path,
    control: Option<&Path>,
    spec: &str,
    busy: &str,
) -> CliResult<()> {
    let control = serving_control(pool, control, busy)?;
    let req = Request::Snapshot {
        name: spec.to_string(),
    };
    let (name, mapped_bytes) = match ask(&control, &req)? {
        Answer::SnapshotCreated { name, mapped_bytes } => (name, mapped_bytes),
        other => return Err(unexpected(&other)),
    };
    emit(&format!(
        "created snapshot '{name}' ({} mapped) in the process serving the pool (control socket {})\n",
        size(mapped_bytes),
        control.display()
    ))
}
