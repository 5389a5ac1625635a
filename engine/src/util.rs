//! Small helpers with no better home.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Identity of this machine's current boot: a hash of the kernel's
/// `boot_id` (never 0), or 0 when it cannot be read. Journal blocks that
/// `persist` writes without a flush carry it (docs/FORMAT.md, 6.6).
pub fn boot_id() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(
        || match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            Ok(s) if !s.trim().is_empty() => fnv1a(s.trim().as_bytes()).max(1),
            _ => 0,
        },
    )
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// 64 random bits from the kernel, or, if /dev/urandom cannot be read,
/// a mix of the clock and the process id (used for nonces, not secrets).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&random_u64().to_le_bytes());
    u[8..].copy_from_slice(&random_u64().to_le_bytes());
    u
}

/// Chain seed of a host's journal: ties the first block to this pool and
/// host, so a journal left on the LUN by an earlier pool is never replayed.
pub fn journal_seed(uuid: &[u8; 16], host_id: u32) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(uuid);
    h.update(&host_id.to_le_bytes());
    h.finalize()
}

/// Where per-host lock files and unflushed records live: $THINLUN_RUN_DIR,
/// else /run/thinlun (tmpfs, cleared at boot), else a per-user directory
/// under the temporary directory.
pub(crate) fn run_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("THINLUN_RUN_DIR") {
        return std::path::PathBuf::from(d);
    }
    let run = std::path::PathBuf::from("/run/thinlun");
    if std::fs::create_dir_all(&run).is_ok() {
        return run;
    }
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("thinlun-{uid}"))
}

/// A byte count for messages people read: "1.0 GiB", "640 KiB", "512 bytes"
/// (binary units, one decimal below 10 units).
pub fn human_bytes(bytes: u64) -> String {
    human_bytes_with(
        bytes,
        &["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"],
        " ",
    )
}

/// A byte count in the largest binary unit that keeps the figure at least
/// 1: one decimal below 10 units (1.5), whole numbers from there (12); a
/// figure that rounds to 1024 is 1.0 of the next unit. `units` names
/// bytes, then KiB up to EiB; `sep` goes between figure and unit.
/// The engine's messages (`human_bytes`) write "1.5 GiB" and "512 bytes",
/// thinctl's tables "1.5G" and "512B".
pub fn human_bytes_with(bytes: u64, units: &[&str; 7], sep: &str) -> String {
    if bytes < 1024 {
        return format!("{bytes}{sep}{}", units[0]);
    }
    let mut idx = 1;
    while idx + 1 < units.len() && bytes >> (10 * (idx + 1)) > 0 {
        idx += 1;
    }
    let unit = 1u128 << (10 * idx);
    let b = bytes as u128;
    let tenths = (b * 10 + unit / 2) / unit;
    if tenths < 100 {
        return format!("{}.{}{sep}{}", tenths / 10, tenths % 10, units[idx]);
    }
    let whole = (b + unit / 2) / unit;
    // Rounding may reach the next unit (1023.7 MiB is 1.0 GiB, not 1024 MiB).
    if whole >= 1024 && idx + 1 < units.len() {
        return format!("1.0{sep}{}", units[idx + 1]);
    }
    format!("{whole}{sep}{}", units[idx])
}

#[cfg(test)]
mod human_tests {
    use super::human_bytes;

    #[test]
    fn units() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(640 << 10), "640 KiB");
        assert_eq!(human_bytes(1 << 60), "1.0 EiB");
        assert_eq!(human_bytes(12 << 30), "12 GiB");
        assert_eq!(human_bytes((1 << 30) - 1), "1.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16 EiB");
    }
}
