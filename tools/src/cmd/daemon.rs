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
use thinlun_vhost::control::request;
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
pub fn word<'a>(what: &str, s: &'a str) -> CliResult<&'a str> {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(CliError::new(format!(
            "{what} '{s}' cannot be sent to the daemon (empty or holds blanks)"
        )));
    }
    Ok(s)
}

/// Sends `line`; the `ok` text, or the daemon's error as ours.
pub fn ask(control: &Path, line: &str) -> CliResult<String> {
    match request(control, line) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(t)) => Err(CliError::new(t)),
        Err(e) => Err(CliError::new(format!(
            "no daemon answers on {} ({e}); start one with 'thinctl daemon' or 'thinctl serve'",
            control.display()
        ))),
    }
}

/// A path as the daemon must see it: its working directory is not ours.
fn absolute(p: &Path) -> CliResult<String> {
    std::path::absolute(p)
        .map(|a| a.to_string_lossy().into_owned())
        .map_err(|e| CliError::io(&p.display().to_string(), e))
}

pub fn add(pool: Option<&Path>, args: &ServeAddArgs) -> CliResult<()> {
    let control = control_of(pool, args.control.as_deref())?;
    let line = match (&args.socket, &args.nbd) {
        (_, Some(nbd)) => format!(
            "add-nbd {} {}",
            word("volume", &args.name)?,
            word("socket", &absolute(nbd)?)?
        ),
        (Some(sock), None) => format!(
            "add {} {} {}{}",
            word("volume", &args.name)?,
            word("socket", &absolute(sock)?)?,
            args.queues,
            if args.incoming { " incoming" } else { "" }
        ),
        (None, None) => return Err(CliError::new("give --socket or --nbd")),
    };
    let t = ask(&control, &line)?;
    emit(&format!("{t}\n"))
}

pub fn remove(pool: Option<&Path>, args: &ServeRemoveArgs) -> CliResult<()> {
    let control = control_of(pool, args.control.as_deref())?;
    let mut line = format!("remove {}", word("volume", &args.name)?);
    if let Some(s) = &args.socket {
        line.push(' ');
        line.push_str(word("socket", &absolute(s)?)?);
    }
    let t = ask(&control, &line)?;
    emit(&format!("{t}\n"))
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

/// A name for a request line (one word; the daemon checks the rest).
pub fn name_word(s: &str) -> CliResult<&str> {
    word("name", s)
}

/// The number after `key=` in an `ok` reply.
pub fn reply_number(reply: &str, key: &str) -> CliResult<u64> {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| unexpected(reply))
}

/// An `ok` reply this thinctl cannot read (another version's daemon):
/// the change was made, only its report is lost.
pub fn unexpected(reply: &str) -> CliError {
    CliError::new(format!(
        "the serving process did it but answered 'ok {reply}', which this thinctl cannot read"
    ))
}

/// `pool grow` for a pool another process serves: that process grows it.
pub fn grow_via_control(pool: &Path, busy: &str) -> CliResult<()> {
    let control = serving_control(pool, None, busy)?;
    let t = ask(&control, "grow")?;
    let bytes = reply_number(&t, "size_bytes")?;
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
    let t = ask(&control, &format!("snapshot {}", word("snapshot", spec)?))?;
    // "VOL@SNAP mapped_bytes=N"
    let mut words = t.split_whitespace();
    let name = words.next().unwrap_or(spec).to_string();
    let mapped = words
        .find_map(|w| w.strip_prefix("mapped_bytes="))
        .and_then(|n| n.parse::<u64>().ok());
    emit(&format!(
        "created snapshot '{name}'{} in the process serving the pool (control socket {})\n",
        mapped.map_or(String::new(), |m| format!(" ({} mapped)", size(m))),
        control.display()
    ))
}
