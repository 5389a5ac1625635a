//! `import`: a raw disk image (file or stdin) into a volume, kept thin.

use super::{open_read_write, pool_path, with_pool, BLOCK, IO_CHUNK};
use crate::error::{emit, CliError, CliResult};
use crate::human::size;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use thinlun::dev::{block_runs, AlignedBuf};
use thinlun::{Pool, Request, Volume, SECTOR_SIZE};

pub fn run(pool: Option<&Path>, name: &str, file: &Path, size_arg: Option<u64>) -> CliResult<()> {
    let path = pool_path(pool)?;
    let from_stdin = file.as_os_str() == "-";
    let what = if from_stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let (mut input, input_len): (Box<dyn Read>, Option<u64>) = if from_stdin {
        (Box::new(io::stdin().lock()), None)
    } else {
        let f = File::open(file).map_err(|e| CliError::io(&what, e))?;
        let len = input_length(&f).map_err(|e| CliError::io(&what, e))?;
        (Box::new(f), len)
    };
    let pool = open_read_write(path)?;
    let (copied, created, allocated) = with_pool(pool, |p| {
        let used_before = p.status().data_used_bytes;
        let created = prepare_volume(p, name, input_len, size_arg, &what)?;
        let result = p
            .open_volume(name)
            .map_err(|e| Failed {
                error: e.into(),
                done: 0,
            })
            .and_then(|vol| copy_in(&vol, &mut input, &what, !created));
        match result {
            Ok(c) => Ok((
                c,
                created,
                p.status().data_used_bytes.saturating_sub(used_before),
            )),
            Err(f) => Err(failed_text(p, name, &what, created, f)),
        }
    })?;
    // The last block is padded to 4 KiB, so data may pass the input's end.
    let data = copied.data.min(copied.read);
    let zero = copied.read - data;
    emit(&format!(
        "imported {} ({} bytes) from {what} into {} '{name}': {} of data written, {} of zero blocks {}; {} newly allocated in the pool\n",
        size(copied.read),
        copied.read,
        if created { "the new volume" } else { "volume" },
        size(data),
        size(zero),
        if created { "left unallocated" } else { "unmapped" },
        size(allocated),
    ))
}

/// The error of a failed import, saying what it left behind. A volume
/// this import created is removed, as `rbd import` removes the image it
/// was creating and an interrupted `zfs recv` leaves no new dataset: a
/// half-imported disk is of no use, and keeping it would hold the space
/// that just ran out. An existing volume keeps what was written, so the
/// message says how far that got.
fn failed_text(p: &Pool, name: &str, what: &str, created: bool, f: Failed) -> CliError {
    let e = f.error;
    let held = format!(
        "the first {} ({} bytes) of {what}{}",
        size(f.done),
        f.done,
        if f.done > 0 {
            " and perhaps part of the next MiB"
        } else {
            ""
        }
    );
    if created {
        return match p.remove_volume(name, false) {
            Ok(()) => CliError::new(format!(
                "{e}; the volume '{name}' this import created was removed, nothing is left behind"
            )),
            Err(r) => CliError::new(format!(
                "{e}; the volume '{name}' this import created holds {held} and could not be removed ({r}): remove it with 'thinctl remove {name}'"
            )),
        };
    }
    CliError::new(format!(
        "{e}; the existing volume '{name}' now holds {held} (the rest of it is unchanged): import again once the problem is fixed"
    ))
}

/// What `copy_in` did: bytes read from the input, and of them the bytes
/// of data blocks written (the rest were zero blocks).
struct Copied {
    read: u64,
    data: u64,
}

/// A failed `copy_in`: the error, and how many bytes from the start of the
/// input were written completely before it.
struct Failed {
    error: CliError,
    done: u64,
}

/// The input's size when it can be known before reading it: regular files
/// and block devices (whose metadata length is 0, so seek to the end).
fn input_length(f: &File) -> io::Result<Option<u64>> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let meta = f.metadata()?;
    if meta.is_file() {
        Ok(Some(meta.len()))
    } else if meta.file_type().is_block_device() {
        let mut f = f;
        let len = f.seek(io::SeekFrom::End(0))?;
        f.seek(io::SeekFrom::Start(0))?;
        Ok(Some(len))
    } else {
        Ok(None)
    }
}

/// Makes sure the volume exists and can hold the input. Returns whether it
/// was created here.
fn prepare_volume(
    pool: &Pool,
    name: &str,
    input_len: Option<u64>,
    size_arg: Option<u64>,
    what: &str,
) -> CliResult<bool> {
    match pool.volume_info(name) {
        Ok(info) => {
            if let Some(s) = size_arg.filter(|&s| s != info.size_bytes) {
                return Err(CliError::new(format!(
                    "volume '{name}' exists with size {} bytes; --size {s} applies only to a new volume (use 'thinctl resize')",
                    info.size_bytes
                )));
            }
            if let Some(len) = input_len.filter(|&len| len > info.size_bytes) {
                return Err(CliError::new(format!(
                    "{what} is {len} bytes, larger than volume '{name}' ({} bytes)",
                    info.size_bytes
                )));
            }
            Ok(false)
        }
        Err(thinlun::Error::NoSuchVolume(_)) => {
            let bytes = match (size_arg, input_len) {
                (Some(s), Some(len)) if len > s => {
                    return Err(CliError::new(format!(
                        "{what} is {len} bytes, larger than --size {s}"
                    )))
                }
                (Some(s), _) => s,
                (None, Some(0)) => {
                    return Err(CliError::new(format!(
                        "{what} is empty; give --size to create an empty volume with 'thinctl create'"
                    )))
                }
                // Volumes are whole 4 KiB blocks; the tail reads as zeros.
                (None, Some(len)) => len.div_ceil(BLOCK as u64) * BLOCK as u64,
                (None, None) => {
                    return Err(CliError::new(format!(
                        "volume '{name}' does not exist and the size of {what} is unknown; give --size SIZE to create it"
                    )))
                }
            };
            pool.create_volume(name, bytes)?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// Streams the input into the volume in `IO_CHUNK` pieces. All-zero blocks
/// are not written, so they take no space; on a volume that already held
/// data (`overwrite`) they are zeroed instead, which unmaps them. Returns
/// the bytes read.
fn copy_in(
    vol: &Volume,
    input: &mut dyn Read,
    what: &str,
    overwrite: bool,
) -> Result<Copied, Failed> {
    let mut offset = 0u64;
    let mut data = 0u64;
    copy_chunks(vol, input, what, overwrite, &mut offset, &mut data).map_err(|error| Failed {
        error,
        done: offset,
    })?;
    Ok(Copied { read: offset, data })
}

/// The loop of [`copy_in`]; `offset` is the input read and written so far
/// (complete chunks only), `data` the data bytes of it.
fn copy_chunks(
    vol: &Volume,
    input: &mut dyn Read,
    what: &str,
    overwrite: bool,
    offset: &mut u64,
    data: &mut u64,
) -> CliResult<()> {
    let vol_size = vol.size_bytes();
    let mut buf = AlignedBuf::zeroed(IO_CHUNK);
    // A run of zero blocks not yet zeroed, carried across chunks so a large
    // hole costs one request: (start, length) in bytes.
    let mut zero_run: Option<(u64, u64)> = None;
    loop {
        let n = read_full(input, &mut buf).map_err(|e| CliError::io(what, e))?;
        if n == 0 {
            break;
        }
        if *offset + n as u64 > vol_size {
            return Err(CliError::new(format!(
                "{what} is larger than volume '{}' ({vol_size} bytes)",
                vol.name()
            )));
        }
        // Pad a short last piece to whole blocks; the volume's size is a
        // multiple of 4 KiB, so the padding still fits.
        let len = n.div_ceil(BLOCK) * BLOCK;
        buf[n..len].fill(0);
        let mut writes = Vec::new();
        for run in block_runs(&buf[..len]) {
            let start = *offset + run.offset as u64;
            if run.zero {
                if overwrite {
                    zero_run = match zero_run {
                        Some((s, l)) => Some((s, l + run.len as u64)),
                        None => Some((start, run.len as u64)),
                    };
                }
                continue;
            }
            if let Some((s, l)) = zero_run.take() {
                vol.write_zeroes(s / SECTOR_SIZE, l / SECTOR_SIZE)
                    .map_err(|e| at_offset(e, s))?;
            }
            writes.push((start, run.offset, run.len));
        }
        // One engine batch per chunk.
        let mut reqs: Vec<Request> = writes
            .iter()
            .map(|&(start, at, run)| Request::Write {
                sector: start / SECTOR_SIZE,
                data: &buf[at..at + run],
            })
            .collect();
        let results = vol.submit(&mut reqs);
        for (r, &(start, _, _)) in results.into_iter().zip(&writes) {
            r.map_err(|e| at_offset(e, start))?;
        }
        *data += writes.iter().map(|w| w.2 as u64).sum::<u64>();
        *offset += n as u64;
        if n < buf.len() {
            break;
        }
    }
    if let Some((s, l)) = zero_run {
        vol.write_zeroes(s / SECTOR_SIZE, l / SECTOR_SIZE)
            .map_err(|e| at_offset(e, s))?;
    }
    vol.flush()?;
    Ok(())
}

fn at_offset(e: thinlun::Error, offset: u64) -> CliError {
    CliError::new(format!("importing at byte {offset}: {e}"))
}

/// Fills `buf` unless the input ends first (pipes deliver short reads).
/// Returns the bytes read; less than `buf.len()` only at end of input.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
