//! Memory that outlives this process but not the machine's boot: a file on
//! tmpfs, mapped shared. A store into it is in the kernel's page cache the
//! moment it is made, so it survives a crash or kill -9 of the process with
//! no I/O at all, and a reboot clears it. The engine keeps the mapping
//! changes of completed writes there until a commit journals them
//! (docs/FORMAT.md, 6.11).

use memmap2::MmapMut;
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A fixed-size byte region that survives the process.
pub trait SurvivingMemory: Send + Sync {
    /// The region's size in bytes.
    fn len(&self) -> usize;
    /// Whether the region has no bytes (no surviving memory at all).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Stores `bytes` at `offset`; the range must lie inside the region.
    fn store(&self, offset: usize, bytes: &[u8]);
    /// Reads `out.len()` bytes at `offset`; the range must lie inside.
    fn load(&self, offset: usize, out: &mut [u8]);
    /// Called when the pool closes cleanly and the contents are no longer
    /// needed (a file is removed).
    fn release(&self) {}
}

/// A file mapped shared (on tmpfs: /run is one).
pub struct MappedFile {
    path: PathBuf,
    map: Mutex<MmapMut>,
}

impl MappedFile {
    /// Opens or creates `path` with exactly `len` bytes, every page
    /// allocated up front: a store into a hole of a full tmpfs would fault
    /// (SIGBUS) instead of failing cleanly here.
    pub fn open(path: &Path, len: usize) -> io::Result<MappedFile> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let have = f.metadata()?.len();
        if have != len as u64 {
            f.set_len(0)?;
            let zeros = vec![0u8; 1 << 20];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len());
                f.write_all(&zeros[..n])?;
                left -= n;
            }
        }
        Ok(MappedFile {
            path: path.to_path_buf(),
            map: Mutex::new(map(&f)?),
        })
    }

    /// The file's contents, if it exists: for read-only opens, which must
    /// not change it.
    pub fn read_existing(path: &Path) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }
}

fn map(f: &File) -> io::Result<MmapMut> {
    // SAFETY: the file lives in a directory only this user writes (the run
    // directory, mode 0700 or root's /run), and one process per pool and
    // host id maps it for writing (the pool's writer lock): nothing else
    // truncates or resizes it while it is mapped, and the engine only
    // reaches it through the bounds-checked slice of the mapping.
    unsafe { MmapMut::map_mut(f) }
}

impl SurvivingMemory for MappedFile {
    fn len(&self) -> usize {
        self.map.lock().len()
    }

    fn store(&self, offset: usize, bytes: &[u8]) {
        self.map.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn load(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.map.lock()[offset..offset + out.len()]);
    }

    fn release(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Surviving memory that is only a copy (what a read-only open reads, or
/// a test's image of it).
pub struct MemCopy(Mutex<Vec<u8>>);

impl MemCopy {
    /// Memory holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> MemCopy {
        MemCopy(Mutex::new(bytes))
    }
}

impl SurvivingMemory for MemCopy {
    fn len(&self) -> usize {
        self.0.lock().len()
    }

    fn store(&self, offset: usize, bytes: &[u8]) {
        self.0.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn load(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.0.lock()[offset..offset + out.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_keeps_its_stores_for_the_next_mapping() {
        let dir = std::env::temp_dir().join(format!("thinlun-surv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec");
        {
            let m = MappedFile::open(&path, 8192).unwrap();
            m.store(4000, b"kept");
            // Dropped without any msync: as a killed process leaves it.
        }
        let m = MappedFile::open(&path, 8192).unwrap();
        let mut out = [0u8; 4];
        m.load(4000, &mut out);
        assert_eq!(&out, b"kept");
        m.release();
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }
}
