//! `diff`, `export-diff` and `import-diff`: changed extents between two
//! points of a volume, and incremental backup streams (format in
//! docs/FORMAT.md, section 8; engine side in `thinlun::diffstream`).

use super::{open_read_only, open_read_write, pool_path, with_pool};
use crate::error::{emit, CliError, CliResult};
use crate::human::size;
use crate::json::{obj, Json, Render};
use crate::table::Table;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use thinlun::diffstream::{export_diff, import_diff, DiffStats};
use thinlun::Pool;

/// Buffer between the engine and a stream file or pipe.
const STREAM_BUF: usize = 1 << 20;

pub fn diff(pool: Option<&Path>, from: &str, to: &str, json: bool) -> CliResult<()> {
    let pool = open_read_only(pool_path(pool)?)?;
    let extents = with_pool(pool, |p| Ok(p.diff(from, to)?))?;
    let total: u64 = extents.iter().map(|e| e.1).sum();
    if json {
        let list = extents
            .iter()
            .map(|&(offset, length)| {
                obj(vec![("offset", offset.into()), ("length", length.into())])
            })
            .collect();
        return emit(
            &obj(vec![
                ("from", from.into()),
                ("to", to.into()),
                ("extents", Json::Array(list)),
                ("extent_count", (extents.len() as u64).into()),
                ("changed_bytes", total.into()),
            ])
            .render(),
        );
    }
    let mut out = String::new();
    if !extents.is_empty() {
        let mut t = Table::new(&[("OFFSET", true), ("LENGTH", true)]);
        for &(offset, length) in &extents {
            t.row(vec![offset.to_string(), length.to_string()]);
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!(
        "{} extent{}, {} ({total} bytes) changed from '{from}' to '{to}'\n",
        extents.len(),
        if extents.len() == 1 { "" } else { "s" },
        size(total)
    ));
    emit(&out)
}

/// Counts the bytes written through it.
struct Counting<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An engine error writing to the user's output: a closed pipe ends the
/// program quietly, as for every other command.
fn output_error(e: thinlun::Error, what: &str) -> CliError {
    match e {
        thinlun::Error::Io { source, .. } => CliError::io(&format!("writing {what}"), source),
        e => e.into(),
    }
}

/// Opens the stream output: stdout for `-`; a new file, an existing one
/// with `force`, or a pipe or character device. Also returns whether a
/// partial output should be deleted on failure.
fn open_output(file: &Path, force: bool) -> CliResult<(Box<dyn Write>, bool)> {
    if file.as_os_str() == "-" {
        if io::stdout().is_terminal() {
            return Err(CliError::new(
                "refusing to write a diff stream to a terminal; redirect stdout or give a file",
            ));
        }
        return Ok((Box::new(io::stdout().lock()), false));
    }
    let what = file.display().to_string();
    match std::fs::metadata(file) {
        Ok(m) if m.file_type().is_fifo() || m.file_type().is_char_device() => {
            let f = OpenOptions::new()
                .write(true)
                .open(file)
                .map_err(|e| CliError::io(&what, e))?;
            Ok((Box::new(f), false))
        }
        Ok(m) if !m.is_file() => Err(CliError::new(format!(
            "{what} is not a regular file or pipe"
        ))),
        Ok(_) if !force => Err(CliError::new(format!(
            "{what} already exists; use --force to overwrite it"
        ))),
        Ok(_) => {
            let f = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(file)
                .map_err(|e| CliError::io(&what, e))?;
            Ok((Box::new(f), true))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(file)
                .map_err(|e| CliError::io(&what, e))?;
            Ok((Box::new(f), true))
        }
        Err(e) => Err(CliError::io(&what, e)),
    }
}

/// `export-diff [FROM] TO FILE|-`, FROM also as `--from`.
pub fn export(
    pool: Option<&Path>,
    args: &[String],
    from_opt: Option<&str>,
    force: bool,
) -> CliResult<()> {
    let (from, to, file) = match args {
        [from, to, file] => {
            if from_opt.is_some() {
                return Err(CliError::new(
                    "give the starting snapshot either as FROM or with --from, not both",
                ));
            }
            (Some(from.as_str()), to.as_str(), file.as_str())
        }
        [to, file] => (from_opt, to.as_str(), file.as_str()),
        _ => {
            return Err(CliError::new(
                "export-diff takes [FROM] TO FILE|- (see 'thinctl export-diff --help')",
            ))
        }
    };
    // `-` (or nothing) as FROM: a full stream.
    let from = from.filter(|f| !f.is_empty() && *f != "-");
    let file = PathBuf::from(file);
    let path = pool_path(pool)?;
    let pool = open_read_only(path)?;
    // Both points must exist before the output is touched.
    pool.volume_info(to)?;
    let to_stdout = file.as_os_str() == "-";
    let what = if to_stdout {
        "stdout".to_string()
    } else {
        file.display().to_string()
    };
    let (out, created) = open_output(&file, force)?;
    let mut out = Counting {
        inner: BufWriter::with_capacity(STREAM_BUF, out),
        bytes: 0,
    };
    let result = with_pool(pool, |p| {
        export_diff(p, from, to, &mut out).map_err(|e| output_error(e, &what))
    });
    let stream_bytes = out.bytes;
    let synced = match out.inner.into_inner() {
        Ok(_) if !created => Ok(()),
        Ok(_) => File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| CliError::io(&what, e)),
        Err(e) => Err(CliError::io(&format!("writing {what}"), e.into_error())),
    };
    let stats = match result.and_then(|s| synced.map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            // A partial stream would only fail later, on import.
            if created {
                let _ = std::fs::remove_file(&file);
            }
            return Err(e);
        }
    };
    if to_stdout {
        return Ok(());
    }
    let start = match from {
        Some(f) if !f.contains('@') => {
            let vol = to.split_once('@').map_or(to, |x| x.0);
            format!("changes from '{vol}@{f}' to '{to}'")
        }
        Some(f) => format!("changes from '{f}' to '{to}'"),
        None => format!("all of '{to}'"),
    };
    emit(&format!(
        "exported {start} to {what}: {}; stream {} ({stream_bytes} bytes)\n",
        describe(&stats),
        size(stream_bytes)
    ))
}

fn describe(s: &DiffStats) -> String {
    format!(
        "{} record{}, {} ({} bytes) of data, {} ({} bytes) zeroed",
        s.records,
        if s.records == 1 { "" } else { "s" },
        size(s.data_bytes),
        s.data_bytes,
        size(s.zero_bytes),
        s.zero_bytes
    )
}

fn snapshot_names(p: &Pool, vol: &str) -> Vec<String> {
    p.volumes()
        .into_iter()
        .filter(|v| v.snapshot_of.as_deref() == Some(vol))
        .map(|v| v.name)
        .collect()
}

/// `import-diff VOL FILE|-`.
pub fn import(pool: Option<&Path>, name: &str, file: &Path) -> CliResult<()> {
    let path = pool_path(pool)?;
    let from_stdin = file.as_os_str() == "-";
    let what = if from_stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let input: Box<dyn Read> = if from_stdin {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(file).map_err(|e| CliError::io(&what, e))?)
    };
    let mut input = BufReader::with_capacity(STREAM_BUF, input);
    let pool = open_read_write(path)?;
    let (stats, created) = with_pool(pool, |p| {
        let before = snapshot_names(p, name);
        let stats = import_diff(p, name, &mut input).map_err(|e| match e {
            thinlun::Error::Io { source, .. } => CliError::io(&format!("reading {what}"), source),
            e => e.into(),
        })?;
        let created: Vec<String> = snapshot_names(p, name)
            .into_iter()
            .filter(|s| !before.contains(s))
            .collect();
        Ok((stats, created))
    })?;
    let snap = match created.first() {
        Some(s) => format!("; created snapshot '{s}'"),
        None => String::new(),
    };
    emit(&format!(
        "imported {what} into '{name}': {}{snap}\n",
        describe(&stats)
    ))
}
