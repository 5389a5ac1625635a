//! Human-readable figures for tables: sizes like `ls -h` (1.5G, 12G),
//! percentages, ratios and UTC timestamps.

/// The units of [`size`], as `ls -h` writes them.
const UNITS: [&str; 7] = ["B", "K", "M", "G", "T", "P", "E"];

/// `bytes` in the largest binary unit that keeps the figure at least 1:
/// one decimal below 10 units (`1.5G`), whole numbers above (`12G`). The
/// engine's [`thinlun::human_bytes_with`] does the arithmetic; its own
/// messages spell the same figures "1.5 GiB".
pub fn size(bytes: u64) -> String {
    thinlun::human_bytes_with(bytes, &UNITS, "")
}

/// `n` things: "1 snapshot", "2 snapshots".
pub fn counted(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The one way every command counts a pool's contents. A volume is every
/// catalog entry that is not a snapshot: writable volumes, linked clones
/// and base images; snapshots (VOL@SNAP) are counted apart.
pub fn volumes_and_snapshots(volumes: u64, snapshots: u64) -> String {
    format!(
        "{} and {}",
        counted(volumes, "volume"),
        counted(snapshots, "snapshot")
    )
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
pub fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

pub fn pct_str(part: u64, whole: u64) -> String {
    format!("{:.1}%", pct(part, whole))
}

/// `num / den` (0 when `den` is 0), e.g. the overcommit ratio.
pub fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm), so no date crate is needed for one column.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0B");
        assert_eq!(size(1023), "1023B");
        assert_eq!(size(1024), "1.0K");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(3 << 29), "1.5G");
        assert_eq!(size(12 << 30), "12G");
        assert_eq!(size(1000 << 20), "1000M");
        assert_eq!(size((1 << 30) - 1), "1.0G");
        assert_eq!(size(u64::MAX), "16E");
    }

    #[test]
    fn percentages_and_ratios() {
        assert_eq!(pct_str(1, 8), "12.5%");
        assert_eq!(pct_str(5, 0), "0.0%");
        assert_eq!(ratio(3, 2), 1.5);
        assert_eq!(ratio(3, 0), 0.0);
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
