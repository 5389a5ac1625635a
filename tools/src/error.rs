//! The one error type of thinctl: a message for `thinctl: <message>` on
//! stderr and the exit code to leave with.

use std::fmt;
use std::io;

/// Exit code of operational errors.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of usage errors: a bad argument, a missing pool (as clap's).
pub const EXIT_USAGE: i32 = 2;
/// `check --repair` / `repair`: problems were found and repaired (as fsck).
pub const EXIT_CHECK_REPAIRED: i32 = 1;
/// `check`: errors were found and left uncorrected (as fsck).
pub const EXIT_CHECK_ERRORS: i32 = 4;
/// `check`: the check itself could not run (as fsck's "operational error").
pub const EXIT_CHECK_FAILED: i32 = 8;
/// Output went to a closed pipe: leave quietly, as if killed by SIGPIPE.
pub const EXIT_BROKEN_PIPE: i32 = 128 + 13;

#[derive(Debug)]
pub struct CliError {
    /// Empty for errors that are reported by exiting alone (broken pipe).
    pub message: String,
    pub code: i32,
}

pub type CliResult<T> = Result<T, CliError>;

impl CliError {
    pub fn new(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: EXIT_FAILURE,
        }
    }

    pub fn with_code(mut self, code: i32) -> CliError {
        self.code = code;
        self
    }

    /// An I/O error on something the user named (a file, stdin, stdout).
    pub fn io(what: &str, e: io::Error) -> CliError {
        if e.kind() == io::ErrorKind::BrokenPipe {
            return CliError {
                message: String::new(),
                code: EXIT_BROKEN_PIPE,
            };
        }
        CliError::new(format!("{what}: {e}"))
    }
}

impl From<thinlun::Error> for CliError {
    fn from(e: thinlun::Error) -> CliError {
        match e {
            // The name typed is not a volume name: a usage error.
            e @ thinlun::Error::InvalidName(_) => {
                CliError::new(e.to_string()).with_code(EXIT_USAGE)
            }
            // Other refusals (a shrink without --force, a size past the
            // pool) depend on the pool: runtime errors.
            e => CliError::new(e.to_string()),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Writes command output to stdout. A reader that went away (`| head`) ends
/// the program quietly instead of panicking as `print!` would.
pub fn emit(text: &str) -> CliResult<()> {
    use io::Write;
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| CliError::io("writing to stdout", e))
}
