//! Size arguments: plain bytes or a number with a binary unit, e.g. `4096`,
//! `64K`, `1.5G`, `8GiB` (case-insensitive; K = KiB = 1024 bytes).

/// Parses a size in bytes. A fraction is allowed when the result is a whole
/// number of bytes (`1.5K` = 1536, but not `0.1K`). Zero is rejected: no
/// thinctl size may be zero.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    if s.starts_with('-') {
        return Err("sizes cannot be negative".into());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift: u32 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        _ if num.is_empty() => return Err(not_a_size(input)),
        _ => {
            return Err(format!(
                "unknown unit '{unit}' (use bytes or K, M, G, T, P, E; KiB, MiB, ... also work)"
            ))
        }
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    // Trailing zeros of a fraction change nothing; dropping them keeps
    // `1.50000G` valid and bounds the arithmetic below.
    let frac = frac.trim_end_matches('0');
    let digits = |d: &str| d.bytes().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(not_a_size(input));
    }
    if frac.len() > 20 {
        return Err("too many decimal places".into());
    }
    let too_large = || "too large (the limit is 16 EiB - 1)".to_string();
    // u128 holds any u64 times 2^60, and any 20-digit fraction times 2^60.
    let int_val: u128 = if int.is_empty() {
        0
    } else if int.trim_start_matches('0').len() > 20 {
        return Err(too_large());
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let mut bytes = int_val.checked_mul(1u128 << shift).ok_or_else(too_large)?;
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = frac.parse::<u128>().map_err(|_| not_a_size(input))? << shift;
        if !scaled.is_multiple_of(scale) {
            return Err("not a whole number of bytes".into());
        }
        bytes += scaled / scale;
    }
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        return Err("size must be greater than zero".into());
    }
    Ok(bytes)
}

/// A `resize` size: absolute, or relative as lvextend and qemu-img resize
/// take it (`+1G` grows by 1 GiB, `-1G` shrinks by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeChange {
    To(u64),
    Grow(u64),
    Shrink(u64),
}

impl SizeChange {
    /// The new size for a volume of `current` bytes.
    pub fn apply(self, current: u64) -> Result<u64, String> {
        match self {
            SizeChange::To(b) => Ok(b),
            SizeChange::Grow(b) => current
                .checked_add(b)
                .ok_or_else(|| "too large (the limit is 16 EiB - 1)".to_string()),
            SizeChange::Shrink(b) if b >= current => Err(format!(
                "cannot shrink by {} a volume of {}",
                crate::human::size(b),
                crate::human::size(current)
            )),
            SizeChange::Shrink(b) => Ok(current - b),
        }
    }
}

pub fn parse_size_change(input: &str) -> Result<SizeChange, String> {
    let s = input.trim();
    if let Some(rest) = s.strip_prefix('+') {
        parse_size(rest).map(SizeChange::Grow)
    } else if let Some(rest) = s.strip_prefix('-') {
        parse_size(rest).map(SizeChange::Shrink)
    } else {
        parse_size(s).map(SizeChange::To)
    }
}

fn not_a_size(input: &str) -> String {
    format!("'{input}' is not a size (examples: 4096, 64K, 1.5G, 8GiB)")
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn plain_bytes_and_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("64kib"), Ok(64 << 10));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size(" 8G "), Ok(8 << 30));
        assert_eq!(parse_size("007"), Ok(7));
    }

    #[test]
    fn fractions_must_give_whole_bytes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("2.K"), Ok(2048));
        assert_eq!(parse_size("1.50000000000000000000000000G"), Ok(3 << 29));
        assert!(parse_size("0.1K").unwrap_err().contains("whole number"));
        assert!(parse_size("1.5").unwrap_err().contains("whole number"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", " ", "abc", "G", "1.2.3G", "-1", "+1", "1 G", "1KB", "1x", "1e3", "0x10", "½K",
            ".", "1GiBs",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_size("12Q").unwrap_err().contains("unknown unit 'Q'"));
        assert!(parse_size("abc").unwrap_err().contains("not a size"));
    }

    #[test]
    fn relative_sizes() {
        use super::{parse_size_change, SizeChange};
        assert_eq!(parse_size_change("+1G"), Ok(SizeChange::Grow(1 << 30)));
        assert_eq!(parse_size_change("-1G"), Ok(SizeChange::Shrink(1 << 30)));
        assert_eq!(parse_size_change("2G"), Ok(SizeChange::To(2 << 30)));
        assert!(parse_size_change("+-1G").is_err());
        assert!(parse_size_change("+0").is_err());
        assert_eq!(SizeChange::Grow(1 << 30).apply(1 << 30), Ok(2 << 30));
        assert_eq!(SizeChange::Shrink(1 << 30).apply(3 << 30), Ok(2 << 30));
        assert!(SizeChange::Shrink(1 << 30).apply(1 << 30).is_err());
        assert!(SizeChange::Grow(u64::MAX).apply(1).is_err());
    }

    #[test]
    fn rejects_zero() {
        for zero in ["0", "0K", "0.0G", "000"] {
            assert!(parse_size(zero).unwrap_err().contains("greater than zero"));
        }
    }

    #[test]
    fn rejects_overflow() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for big in [
            "18446744073709551616",
            "16E",
            "16384P",
            "99999999999999999999999999999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_size(big).unwrap_err().contains("too large"), "{big}");
        }
        assert!(parse_size("1.00000000000000000000001K").is_err());
    }
}
