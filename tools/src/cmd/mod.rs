//! The commands. Each one gathers what it will print, closes the pool, and
//! only then prints, so nothing claims success before the pool is closed.

pub mod check;
pub mod daemon;
pub mod diff;
pub mod du;
pub mod dump;
pub mod export;
pub mod foreign;
pub mod import;
pub mod lock;
pub mod map;
pub mod pool;
pub mod repair;
pub mod serve;
pub mod snapshot;
pub mod space;
pub mod volume;

use crate::error::{CliError, CliResult};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use thinlun::{HostOptions, OpenOptions, Pool};

/// This host's id on shared pools: `--host-id`, `THINLUN_HOST_ID`, or
/// `host_id = N` in /etc/thinlun/thinlun.conf (or `$THINLUN_CONFIG`).
static HOST_ID: OnceLock<Option<u32>> = OnceLock::new();

pub fn set_host_id(flag: Option<u32>) -> CliResult<()> {
    let id = match flag {
        Some(id) => Some(id),
        None => host_id_from_config()?,
    };
    let _ = HOST_ID.set(id);
    Ok(())
}

fn host_id_from_config() -> CliResult<Option<u32>> {
    let path = std::env::var_os("THINLUN_CONFIG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/etc/thinlun/thinlun.conf".into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CliError::io(&path.display().to_string(), e)),
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == "host_id" {
                return v.trim().parse().map(Some).map_err(|_| {
                    CliError::new(format!(
                        "{}: host_id '{}' is not a number",
                        path.display(),
                        v.trim()
                    ))
                });
            }
        }
    }
    Ok(None)
}

/// How thinctl opens a pool for writing: as this host on a shared pool,
/// with the lease watchdog armed (a frozen thinctl must not wake up and
/// write after other hosts declared it dead).
pub fn write_options() -> OpenOptions {
    OpenOptions {
        read_only: false,
        host: HOST_ID.get().copied().flatten().map(|host_id| HostOptions {
            host_id,
            watchdog: true,
            ..HostOptions::default()
        }),
        boot_id: None,
        ..OpenOptions::default()
    }
}

/// Bytes moved per engine call by `import` and `export`: large enough to
/// batch well, small enough to keep memory flat.
pub const IO_CHUNK: usize = 1 << 20;
pub const BLOCK: usize = thinlun::BLOCK_SIZE;

/// The `--pool` path, or a message naming both ways to give it.
pub fn pool_path(pool: Option<&Path>) -> CliResult<&Path> {
    pool.ok_or_else(|| {
        CliError::new("no pool given: use -p/--pool PATH or set THINLUN_POOL")
            .with_code(crate::error::EXIT_USAGE)
    })
}

/// A missing path would otherwise surface as a bare ENOENT from the engine.
pub fn require_exists(path: &Path) -> CliResult<()> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CliError::new(format!(
            "{} does not exist (create a pool with 'thinctl pool create --size SIZE')",
            path.display()
        ))),
        Err(e) => Err(CliError::io(&path.display().to_string(), e)),
    }
}

/// Opens the pool for inspection: no writes, no lock, no journal replay
/// written back.
pub fn open_read_only(path: &Path) -> CliResult<Pool> {
    require_exists(path)?;
    let pool = Pool::open_path(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    report_warnings(&pool);
    Ok(pool)
}

/// How long a command waits for a pool another command has open for
/// writing (`--wait`, `--no-wait`).
static WAIT: OnceLock<Duration> = OnceLock::new();

pub fn set_wait(secs: u64) {
    let _ = WAIT.set(Duration::from_secs(secs));
}

/// Opens the pool for writing, waiting while another process has it
/// (`Busy`) up to `--wait`, with a line on stderr when it starts waiting.
/// `give_up` says whether a busy pool should not be waited for (a serving
/// process answers on its control socket instead).
fn open_writable_waiting(path: &Path, give_up: impl Fn() -> bool) -> thinlun::Result<Pool> {
    let wait = WAIT.get().copied().unwrap_or(Duration::from_secs(60));
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match Pool::open_path(path, &write_options()) {
            Err(thinlun::Error::Busy { message: why, .. })
                if Instant::now() < deadline && !give_up() =>
            {
                if !said {
                    eprintln!(
                        "thinctl: waiting up to {} s for {}: {why}",
                        wait.as_secs(),
                        path.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(50 + jitter_ms()));
            }
            r => return r,
        }
    }
}

/// A little jitter, so that waiting commands do not retry in lockstep.
fn jitter_ms() -> u64 {
    u64::from(std::process::id() % 7) * 10
}

/// Opens the pool for writing, waiting for other commands as
/// [`open_read_write`] does, but not for a serving process: that one keeps
/// the pool, and `Busy` then means "ask it on its control socket".
pub fn open_unless_served(path: &Path, control: Option<&Path>) -> thinlun::Result<Pool> {
    open_writable_waiting(path, || daemon::serving_control(path, control, "").is_ok())
}

/// Opens the pool for changes; pair with [`close`].
pub fn open_read_write(path: &Path) -> CliResult<Pool> {
    require_exists(path)?;
    let pool = open_writable_waiting(path, || false)?;
    report_warnings(&pool);
    Ok(pool)
}

/// Where a change to the pool is made: on the pool opened here, or by the
/// process that holds it (serve or daemon), through its control socket.
pub enum Writer {
    Open(Pool),
    Served(std::path::PathBuf),
}

/// Opens the pool for changes like [`open_read_write`]; when a serving
/// process holds it (`Busy`), its control socket instead (an error if it
/// has none). `control` is the socket to use [default: `THINLUN_CONTROL`,
/// else the pool's].
pub fn open_or_served(path: &Path, control: Option<&Path>) -> CliResult<Writer> {
    require_exists(path)?;
    match open_unless_served(path, control) {
        Ok(pool) => {
            report_warnings(&pool);
            Ok(Writer::Open(pool))
        }
        Err(thinlun::Error::Busy { message: why, .. }) => {
            daemon::serving_control(path, control, &why).map(Writer::Served)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `f` on the pool, then closes it explicitly so a failing final
/// commit is reported rather than lost in a drop. The first error wins.
pub fn with_pool<T>(pool: Pool, f: impl FnOnce(&Pool) -> CliResult<T>) -> CliResult<T> {
    let result = f(&pool);
    let closed = pool.close();
    let value = result?;
    closed.map_err(|e| CliError::new(format!("closing the pool: {e}")))?;
    Ok(value)
}

pub fn report_warnings(pool: &Pool) {
    for w in pool.warnings() {
        eprintln!("thinctl: warning: {w}");
    }
}
