//! thinctl: the admin command line for thinlun pools and thin volumes.
//! This file holds the argument definitions and the dispatch; the work is
//! in `cmd`, a thin layer over the engine API.

mod cmd;
mod error;
mod human;
mod json;
mod progress;
mod size;
mod table;

use clap::{Parser, Subcommand};
use error::{CliError, CliResult};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "thinctl",
    version,
    about = "Administer thinlun pools and their thin volumes",
    after_help = "Sizes are bytes or a number with a binary unit: 4096, 64K, 1.5G, 8GiB.\n\
                  Exit status: 0 success, 1 error, 2 usage error; check and repair as fsck: 0 clean,\n\
                  1 repaired, 4 errors left, 8 could not check."
)]
struct Cli {
    /// Pool file or block device
    #[arg(short, long, env = "THINLUN_POOL", global = true, value_name = "PATH")]
    pool: Option<PathBuf>,

    /// This host's id on a shared pool (1..=its host count); also
    /// THINLUN_HOST_ID or host_id in /etc/thinlun/thinlun.conf
    // Only >= 1 here: the pool knows its host count and says it (1..=16).
    #[arg(long, env = "THINLUN_HOST_ID", global = true, value_name = "N",
          value_parser = host_id_arg)]
    host_id: Option<u32>,

    /// How long to wait, in seconds, for a pool that another thinctl
    /// command has open for writing (as LVM commands wait for their lock)
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 60,
        conflicts_with = "no_wait"
    )]
    wait: u64,

    /// Fail at once when another thinctl command has the pool open
    #[arg(long, global = true)]
    no_wait: bool,

    /// Print JSON (check, repair, list, info, du, diff, pool status, lock
    /// status); accepted before or after the command
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make and manage the pool: create, status, set (thresholds and policies), grow
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Verify the pool's metadata (exit 0 clean, 1 repaired with --repair, 4 errors left, 8 could not check)
    #[command(
        long_about = "Verify every invariant of the pool's metadata: checksums, tree structure, \
references against reference counts, no block owned twice, free-space accounting, the volume \
catalog and the reserved multi-host structures. Problems are printed in words; warnings are \
damage a redundant copy covers.\n\n\
Without --repair nothing is written: the pool is only read (no lock, no journal replay written \
back), so a check runs without write access and while a serve or daemon process holds the pool \
(a pool changing under the check may then show transient errors; check again).\n\n\
Exit status as fsck: 0 clean, 1 problems found and repaired (--repair), 4 errors left, 8 the \
check could not run."
    )]
    Check {
        /// Never write (the default without --repair); accepted like fsck -n
        #[arg(short = 'n', long, conflicts_with = "repair")]
        read_only: bool,
        /// Repair what can be repaired without guessing (runs 'thinctl repair')
        #[arg(long)]
        repair: bool,
    },
    /// Fix what can be fixed without guessing; refuse the rest (exit 0 nothing to do, 1 repaired, 4 refused)
    #[command(
        long_about = "Fix what can be fixed without guessing (what the pool's redundancy determines), and refuse \
the rest.\n\n\
Fixed: a damaged, missing or out-of-date superblock copy (rewritten from its twin); a damaged copy \
of a volume header or host journal checkpoint (rewritten from its twin); a torn block at the end of \
the journal (an interrupted commit, cleared after a checkpoint); journal changes not yet in the \
trees (folded in); a damaged host slot or lock register of a single-host pool, which never \
uses them (cleared). Free space and reference counts are not stored on disk: every open rebuilds \
them from the mapping trees, so leaked blocks are free again without a repair.\n\n\
Refused, with nothing written (exit 4): anything check reports as an error, such as both copies \
of a record damaged or a damaged mapping-tree node; restore the metadata from a dump \
('thinctl restore') or the volumes from backups.\n\n\
--salvage VOL (repeatable) rebuilds a volume's tree that holds an unreadable mapping node from \
what is still readable: the range the node mapped reads as zeros from then on, and is reported \
in sectors and bytes. It is never run without being asked for. A node shared with snapshots or \
clones is salvaged only in the volumes named; the others stay damaged (the report lists them). \
The blocks only the lost part mapped are free again once no damaged tree is left.\n\n\
The repair is built on an in-memory copy of the metadata and verified with check before \
anything is written; then the writes go to the pool in the engine's normal update order. \
Needs the pool to itself (stop serve/daemon first)."
    )]
    Repair {
        /// Say what would be fixed and verify it in memory; write nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Rebuild damaged volume VOL's tree from what is readable; its lost range reads as zeros
        #[arg(long, value_name = "VOL")]
        salvage: Vec<String>,
    },
    /// Write the pool's metadata as readable JSON (volumes, relations, mappings; see docs/FORMAT.md)
    #[command(
        long_about = "Write the pool's metadata as a JSON document: the superblock fields, \
every volume and snapshot with its catalog and header fields, snapshot and clone relations, and \
its mapping as extents [virtual block, physical block or \"zero\", length in blocks] after \
journal replay. Only reads the pool (works while it is served). The format is described in \
docs/FORMAT.md, section 9."
    )]
    Dump {
        /// Output file [default: stdout]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write metadata from a dump back onto the pool (fresh metadata blocks, new generation)
    #[command(
        long_about = "Write the metadata of a 'thinctl dump' document onto the pool: new mapping \
trees, volume headers and catalog in free blocks of the data area, a new superblock generation \
and a fresh journal start. The data area is not touched: the dump's extents must still point at \
the data. Refused: a dump of another pool geometry (always); a pool that still opens, or of \
another uuid, unless --force. The result is verified in memory (it must check clean and read \
back as the dump) before anything is written. Needs the pool to itself."
    )]
    Restore {
        /// The dump to restore (- for stdin)
        #[arg(short, long, value_name = "FILE")]
        input: PathBuf,
        /// Replace the metadata of a pool that still opens, or of another pool identity
        #[arg(long)]
        force: bool,
        /// Build and verify in memory; write nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
    /// Create a thin volume (no space is allocated until it is written)
    Create {
        /// Name of the new volume
        name: String,
        /// Virtual size, a multiple of 4 KiB
        #[arg(value_parser = size_arg, allow_hyphen_values = true)]
        size: u64,
        /// Create it even past the pool's overcommit limit
        #[arg(long)]
        force: bool,
    },
    /// Return the pool's free space to the file system (hole punch) or, with
    /// --discard, to the SAN (BLKDISCARD on a block device)
    Trim {
        /// Discard the free space on the device (BLKDISCARD) instead of punching holes in the file
        #[arg(long)]
        discard: bool,
    },
    /// List volumes and snapshots, each snapshot under its volume, oldest first
    #[command(
        long_about = "List volumes and snapshots, each snapshot under its volume, oldest first.\n\n\
A volume is every entry that is not a snapshot: writable volumes, linked clones (writable volumes \
made from a snapshot or base image, sharing its data) and base images (read-only volumes that \
clones share). A snapshot (VOL@SNAP) is a read-only point-in-time image of a volume. pool status \
and check count them the same way."
    )]
    List {
        /// What to list, separated by commas: volume, snapshot, base, clone, all
        #[arg(short = 't', long = "type", value_name = "TYPE,...", value_delimiter = ',',
              value_parser = ["volume", "snapshot", "base", "clone", "all"])]
        types: Vec<String>,
        #[command(flatten)]
        output: table::OutputArgs,
    },
    /// Show one volume
    Info {
        /// Volume, snapshot (VOL@SNAP) or base image
        name: String,
        #[command(flatten)]
        output: table::OutputArgs,
    },
    /// Grow or shrink a volume
    Resize {
        /// Volume to resize
        name: String,
        /// New virtual size, a multiple of 4 KiB; +SIZE grows by SIZE,
        /// -SIZE shrinks by it
        #[arg(value_parser = size::parse_size_change, allow_hyphen_values = true,
              value_name = "[+|-]SIZE")]
        size: size::SizeChange,
        /// Allow shrinking, which discards the data past the new end
        #[arg(long)]
        force: bool,
    },
    /// Rename a volume
    Rename {
        /// Current name
        old: String,
        /// New name
        new: String,
    },
    /// Remove a volume or snapshot (VOL@SNAP) and return its space to the pool
    Remove {
        /// Volume, snapshot (VOL@SNAP) or base image to remove
        name: String,
        /// Also remove the volume's snapshots
        #[arg(short, long)]
        recursive: bool,
    },
    /// Copy a raw image into a volume (created if missing); zero blocks take no space
    Import {
        /// Volume to write (created if missing)
        name: String,
        /// Image file, or - for stdin
        file: PathBuf,
        /// Size of the volume to create (required with stdin if the volume does not exist)
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
    },
    /// Copy a volume out as a raw image (sparse when written to a file)
    Export {
        /// Volume or snapshot (VOL@SNAP) to copy out
        name: String,
        /// Output file, or - for stdout
        file: PathBuf,
        /// Overwrite an existing file or device
        #[arg(long)]
        force: bool,
    },
    /// Serve a volume to a VM over vhost-user-blk (or NBD) until SIGTERM/SIGINT
    Serve(cmd::serve::ServeArgs),
    /// Serve volumes of the pool, added and removed at run time through a
    /// control socket, until SIGTERM/SIGINT
    Daemon(cmd::daemon::DaemonArgs),
    /// Ask the serving process (daemon or serve) to serve another volume
    ServeAdd(cmd::daemon::ServeAddArgs),
    /// Ask the serving process to stop serving a volume
    ServeRemove(cmd::daemon::ServeRemoveArgs),
    /// Attach a volume as a local block device (/dev/nbdN) through the
    /// kernel's NBD client; the serving process exports it
    Map(cmd::map::MapArgs),
    /// Detach a device attached by 'map'
    Unmap(cmd::map::UnmapArgs),
    #[command(flatten)]
    Snap(cmd::snapshot::SnapCommand),
    /// Leases of a shared pool
    #[command(subcommand)]
    Lock(LockCommand),
    /// Release this host's activation of a volume on a shared pool (live
    /// migration: release here, then open or serve it on the target host)
    Release {
        /// Volume to release
        name: String,
    },
}

#[derive(Subcommand)]
enum LockCommand {
    /// Hosts (live, silent, dead, free), the global lock, active volumes
    /// and allocation-group claims
    Status {
        #[command(flatten)]
        output: table::OutputArgs,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Create a pool on a file (made, sparse, if missing) or block device
    Create {
        /// Pool size; default: the whole file or device
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Allocation chunk: a power of two from 64K to 1G [default: 1M]
        #[arg(long, value_parser = size_arg)]
        chunk_size: Option<u64>,
        /// Hosts that may share the pool [default: 16]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
        max_hosts: Option<u32>,
        /// Journal size per host (at least 256K) [default: scales with the pool]
        #[arg(long, value_parser = size_arg)]
        journal_size: Option<u64>,
        /// Copies of every mapping-tree node: 2 keeps a volume readable
        /// when one node block goes bad; 1 halves the tree metadata
        #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
        node_copies: u8,
        /// Overwrite an existing pool
        #[arg(long)]
        force: bool,
        /// Share the pool between hosts through leases on the LUN; every
        /// writer then needs a host id (--host-id)
        #[arg(long)]
        shared: bool,
        /// Lease I/O timeout of a shared pool: hosts renew every 2x, fence
        /// themselves by 7x and are declared dead after 9x [default: 10s]
        #[arg(long, value_name = "DURATION", value_parser = cmd::lock::io_timeout_arg, requires = "shared")]
        io_timeout: Option<u32>,
        /// Allocation-group size of a shared pool (hosts claim whole
        /// groups to allocate in) [default: 1G]
        #[arg(long, value_parser = size_arg, requires = "shared")]
        group_size: Option<u64>,
    },
    /// Show space use, volumes, journal and policy
    Status,
    /// Change warning thresholds, the when-full policy or the overcommit limit
    Set {
        /// Data use warnings, e.g. 80,90,95 (percent, ascending) or none
        #[arg(long, value_parser = cmd::space::thresholds_arg)]
        data_thresholds: Option<cmd::space::Thresholds>,
        /// Metadata use warnings, e.g. 80,90,95 or none
        #[arg(long, value_parser = cmd::space::thresholds_arg)]
        metadata_thresholds: Option<cmd::space::Thresholds>,
        /// When data space is full: error (fail with ENOSPC) or queue (wait)
        #[arg(long, value_name = "error|queue", value_parser = ["error", "queue"])]
        when_full: Option<String>,
        /// How long queued writes wait for space, in seconds
        #[arg(long, value_name = "SECS")]
        queue_timeout: Option<u32>,
        /// Refuse volumes past this provisioned/data ratio (e.g. 2.5), or none
        #[arg(long, value_name = "RATIO|none", value_parser = cmd::space::overcommit_arg)]
        max_overcommit: Option<u32>,
    },
    /// Extend the pool onto its grown file or LUN
    Grow,
}

fn size_arg(s: &str) -> Result<u64, String> {
    size::parse_size(s)
}

/// Whether a command has a JSON form (the others refuse `--json`).
fn has_json(c: &Command) -> bool {
    matches!(
        c,
        Command::Check { .. }
            | Command::Repair { .. }
            | Command::List { .. }
            | Command::Info { .. }
            | Command::Pool(PoolCommand::Status)
            | Command::Lock(LockCommand::Status { .. })
            | Command::Snap(cmd::snapshot::SnapCommand::Du { .. })
            | Command::Snap(cmd::snapshot::SnapCommand::Diff { .. })
    )
}

fn run(cli: Cli) -> CliResult<()> {
    let json = cli.json;
    if json && !has_json(&cli.command) {
        return Err(CliError::new(
            "--json is not supported by this command (see 'thinctl --help')",
        )
        .with_code(error::EXIT_USAGE));
    }
    cmd::set_host_id(cli.host_id)?;
    cmd::set_wait(if cli.no_wait { 0 } else { cli.wait });
    let pool = cli.pool.as_deref();
    match cli.command {
        Command::Pool(PoolCommand::Create {
            size,
            chunk_size,
            max_hosts,
            journal_size,
            node_copies,
            force,
            shared,
            io_timeout,
            group_size,
        }) => cmd::pool::create(
            pool,
            cmd::pool::CreateArgs {
                size,
                chunk_size,
                max_hosts,
                journal_size,
                ditto_nodes: node_copies == 2,
                force,
                shared: shared.then(|| thinlun::SharedConfig {
                    io_timeout_ms: io_timeout.unwrap_or(thinlun::lease::DEFAULT_IO_TIMEOUT_MS),
                    group_bytes: group_size,
                }),
            },
        ),
        Command::Pool(PoolCommand::Status) => cmd::pool::status(pool, json),
        Command::Pool(PoolCommand::Set {
            data_thresholds,
            metadata_thresholds,
            when_full,
            queue_timeout,
            max_overcommit,
        }) => cmd::space::set(
            pool,
            cmd::space::PolicyArgs {
                data_thresholds,
                metadata_thresholds,
                when_full,
                queue_timeout_secs: queue_timeout,
                max_overcommit,
            },
        ),
        Command::Pool(PoolCommand::Grow) => cmd::space::grow(pool),
        Command::Trim { discard } => cmd::space::trim(pool, discard),
        Command::Check { read_only, repair } => {
            if repair {
                cmd::repair::run(pool, false, json)
            } else {
                cmd::check::run(pool, read_only, json)
            }
        }
        Command::Repair { dry_run, salvage } if !salvage.is_empty() => {
            cmd::repair::salvage(pool, &salvage, dry_run, json)
        }
        Command::Repair { dry_run, .. } => cmd::repair::run(pool, dry_run, json),
        Command::Dump { output } => cmd::dump::dump(pool, output.as_deref()),
        Command::Restore {
            input,
            force,
            dry_run,
        } => cmd::dump::restore(pool, &input, force, dry_run),
        Command::Create { name, size, force } => cmd::volume::create(pool, &name, size, force),
        Command::List { types, output } => cmd::volume::list(pool, &types, &output, json),
        Command::Info { name, output } => cmd::volume::info(pool, &name, &output, json),
        Command::Resize { name, size, force } => cmd::volume::resize(pool, &name, size, force),
        Command::Rename { old, new } => cmd::volume::rename(pool, &old, &new),
        Command::Remove { name, recursive } => cmd::volume::remove(pool, &name, recursive),
        Command::Import { name, file, size } => cmd::import::run(pool, &name, &file, size),
        Command::Export { name, file, force } => cmd::export::run(pool, &name, &file, force),
        Command::Serve(args) => cmd::serve::run(pool, &args),
        Command::Daemon(args) => cmd::daemon::run(pool, &args),
        Command::ServeAdd(args) => cmd::daemon::add(pool, &args),
        Command::ServeRemove(args) => cmd::daemon::remove(pool, &args),
        Command::Map(args) => cmd::map::map(pool, &args),
        Command::Unmap(args) => cmd::map::unmap(&args),
        Command::Snap(c) => cmd::snapshot::run(pool, c, json),
        Command::Lock(LockCommand::Status { output }) => cmd::lock::status(pool, &output, json),
        Command::Release { name } => cmd::lock::release(pool, &name),
    }
}

/// clap's own errors, as one `thinctl:` line like every other error: its
/// first paragraph, joined, without the "error: " prefix.
fn usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = first.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    format!("{msg} (see 'thinctl --help')")
}

/// The libraries' messages on stderr: a UTC timestamp (to line up the logs
/// of two hosts' servers), the crate, and the message; info and above
/// unless RUST_LOG says otherwise.
fn install_logger() {
    use std::io::Write;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let from = match record.target().split("::").next() {
                Some("thinlun") => "thinlun",
                Some("thinlun_vhost") => "thinlun-vhost",
                Some("thinlun_nbd") => "thinlun-nbd",
                Some(other) => other,
                None => "thinctl",
            };
            let level = match record.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            let ts = buf.timestamp_millis();
            writeln!(buf, "{ts} {from}: {level}{}", record.args())
        })
        .init();
}

/// `--host-id`: a positive number; the pool checks it against its host
/// count when it is opened.
fn host_id_arg(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("host ids start at 1 (a pool has ids 1..=its host count)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "'{s}' is not a host id (1..=the pool's host count)"
        )),
    }
}

fn main() -> ExitCode {
    install_logger();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and the full help when a subcommand is missing.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("thinctl: {}", usage_error(&e));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError { message, code }) => {
            if !message.is_empty() {
                // One line, whatever the engine or OS put in the message.
                eprintln!("thinctl: {}", message.replace('\n', "; "));
            }
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod help_tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every argument and flag of every command says what it is for.
    #[test]
    fn every_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "thinctl", &mut missing);
        assert!(missing.is_empty(), "no description: {missing:#?}");
    }
}
