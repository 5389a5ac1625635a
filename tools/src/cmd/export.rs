//! `export`: a volume out as a raw image, sparse when written to a file.

use super::{open_read_only, pool_path, with_pool, IO_CHUNK};
use crate::error::{emit, CliError, CliResult};
use crate::human::size;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use thinlun::dev::{block_runs, AlignedBuf};
use thinlun::{Volume, SECTOR_SIZE};

/// Where the image goes: a regular file gets holes for zero blocks; a
/// stream or device gets every byte.
enum Sink {
    /// A regular file, written with holes where the volume has none, from
    /// byte `base` on.
    File {
        f: File,
        base: u64,
    },
    Stream(Box<dyn Write>),
}

/// Stdout as a sparse file when it is redirected to a regular file (`>
/// img`); a stream otherwise, and when opened for appending (`>> img`),
/// where positioned writes would append instead.
fn stdout_sink() -> Sink {
    use std::io::Seek;
    use std::os::fd::AsFd;
    let file = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(File::from)
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
        .filter(|_| !stdout_appends());
    match file {
        Some(mut f) => match f.stream_position() {
            Ok(base) => Sink::File { f, base },
            Err(_) => Sink::Stream(Box::new(io::stdout().lock())),
        },
        None => Sink::Stream(Box::new(io::stdout().lock())),
    }
}

/// Whether stdout has O_APPEND, as /proc/self/fdinfo/1 shows its flags
/// (octal); unknown counts as appending, which only costs sparseness.
fn stdout_appends() -> bool {
    const O_APPEND: u32 = 0o2000;
    std::fs::read_to_string("/proc/self/fdinfo/1")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .is_none_or(|flags| flags & O_APPEND != 0)
}

pub fn run(pool: Option<&Path>, name: &str, file: &Path, force: bool) -> CliResult<()> {
    let path = pool_path(pool)?;
    let to_stdout = file.as_os_str() == "-";
    let what = if to_stdout {
        "stdout".to_string()
    } else {
        file.display().to_string()
    };
    if to_stdout && io::stdout().is_terminal() {
        return Err(CliError::new(
            "refusing to write a raw image to a terminal; redirect stdout or give a file",
        ));
    }
    let pool = open_read_only(path)?;
    // The volume must exist before the output file is touched.
    let vol = pool.open_volume(name)?;
    let (mut sink, created) = if to_stdout {
        (stdout_sink(), false)
    } else {
        open_output(file, force)?
    };
    let total = vol.size_bytes();
    let result = with_pool(pool, |_| {
        let r = copy_out(&vol, &mut sink, total, &what);
        drop(vol);
        r
    });
    drop(sink);
    let stored = match result {
        Ok(n) => n,
        Err(e) => {
            // A partial image this command created would pass for a copy.
            if created {
                let _ = std::fs::remove_file(file);
            }
            return Err(e);
        }
    };
    // On stdout the image is the output: nothing may follow it.
    if to_stdout {
        return Ok(());
    }
    emit(&format!(
        "exported '{name}' to {what}: {} ({total} bytes), {} ({stored} bytes) of it data\n",
        size(total),
        size(stored)
    ))
}

/// Opens the output; also returns whether this call created the file.
fn open_output(file: &Path, force: bool) -> CliResult<(Sink, bool)> {
    let what = file.display().to_string();
    let meta = match std::fs::metadata(file) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(CliError::io(&what, e)),
    };
    let Some(meta) = meta else {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .map_err(|e| CliError::io(&what, e))?;
        return Ok((Sink::File { f, base: 0 }, true));
    };
    let ft = meta.file_type();
    // Pipes and character devices (/dev/null) are streams, not data to lose.
    if ft.is_fifo() || ft.is_char_device() {
        let f = OpenOptions::new()
            .write(true)
            .open(file)
            .map_err(|e| CliError::io(&what, e))?;
        return Ok((Sink::Stream(Box::new(f)), false));
    }
    if !force {
        return Err(CliError::new(format!(
            "{what} already exists; use --force to overwrite it"
        )));
    }
    if ft.is_block_device() {
        let f = OpenOptions::new()
            .write(true)
            .open(file)
            .map_err(|e| CliError::io(&what, e))?;
        return Ok((Sink::Stream(Box::new(f)), false));
    }
    if !meta.is_file() {
        return Err(CliError::new(format!(
            "{what} is not a regular file, device or pipe"
        )));
    }
    // Truncate so the blocks skipped below read as zeros.
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)
        .map_err(|e| CliError::io(&what, e))?;
    Ok((Sink::File { f, base: 0 }, false))
}

/// Copies the whole volume out. Returns the bytes of non-zero blocks.
fn copy_out(vol: &Volume, sink: &mut Sink, total: u64, what: &str) -> CliResult<u64> {
    let mut buf = AlignedBuf::zeroed(IO_CHUNK);
    let mut offset = 0u64;
    let mut stored = 0u64;
    let io_err = |e| CliError::io(&format!("writing {what}"), e);
    while offset < total {
        // `total` is whole blocks, so every piece is too.
        let len = (total - offset).min(IO_CHUNK as u64) as usize;
        let chunk = &mut buf[..len];
        vol.read(offset / SECTOR_SIZE, chunk).map_err(|e| {
            CliError::new(format!("reading '{}' at byte {offset}: {e}", vol.name()))
        })?;
        for run in block_runs(chunk) {
            let bytes = &chunk[run.offset..run.offset + run.len];
            if !run.zero {
                stored += run.len as u64;
            }
            match sink {
                Sink::File { f, base } if !run.zero => f
                    .write_all_at(bytes, *base + offset + run.offset as u64)
                    .map_err(io_err)?,
                Sink::File { .. } => {}
                Sink::Stream(w) => w.write_all(bytes).map_err(io_err)?,
            }
        }
        offset += len as u64;
    }
    match sink {
        Sink::File { f, base } => {
            // Trailing holes need the length set explicitly.
            f.set_len(*base + total).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        Sink::Stream(w) => w.flush().map_err(io_err)?,
    }
    Ok(stored)
}
