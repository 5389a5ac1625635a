//! A pool on a real block device: a loop device over a file (needs root and
//! losetup; skipped with a note otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;
use thinlun::{check::check, dev::FileDevice, OpenOptions, Pool, PoolConfig};

struct Loop {
    dev: PathBuf,
    backing: PathBuf,
}

impl Loop {
    fn attach(size: u64) -> Option<Loop> {
        let backing = std::env::temp_dir().join(format!("thinlun-loop-{}.img", std::process::id()));
        std::fs::File::create(&backing).ok()?.set_len(size).ok()?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .ok()?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&backing);
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop { dev, backing })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn pattern(i: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|k| (k ^ i.wrapping_mul(31)) as u8)
        .collect()
}

fn run_on(dev: &Path) {
    let pool = Pool::create_path(dev, &PoolConfig::default()).unwrap();
    pool.create_volume("vm-100-disk-0", 1 << 30).unwrap();
    let vol = pool.open_volume("vm-100-disk-0").unwrap();
    for i in 0..256u64 {
        vol.write(i * 997 * 8, &pattern(i)).unwrap();
    }
    vol.flush().unwrap();
    drop(vol);
    pool.close().unwrap();
    let report = check(&FileDevice::open(dev, false).unwrap(), "loop").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    assert_eq!(report.mapped_blocks, 256);
    let pool = Pool::open_path(
        dev,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let vol = pool.open_volume("vm-100-disk-0").unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..256u64 {
        vol.read(i * 997 * 8, &mut buf).unwrap();
        assert!(buf == pattern(i), "block {i} differs after reopen");
    }
}

#[test]
fn pool_on_a_loop_device() {
    let Some(lo) = Loop::attach(256 << 20) else {
        eprintln!("skipped: cannot attach a loop device here (needs root and losetup)");
        return;
    };
    run_on(&lo.dev);
}
