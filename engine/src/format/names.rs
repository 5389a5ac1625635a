//! Volume names: what LVM and Proxmox use (`vm-100-disk-0`,
//! `base-9000-disk-1`), `[A-Za-z0-9._-]`, 1 to 128 characters, not
//! starting with '-' (it would read as an option) and not "." or "..".

/// Longest volume name, in bytes (the catalog's name field).
pub const MAX_NAME_LEN: usize = 128;

/// Whether `name` may name a volume or a snapshot (the part after `@`).
pub fn is_valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_proxmox_names_and_rejects_the_rest() {
        for ok in [
            "vm-100-disk-0",
            "base-9000-disk-1",
            "a",
            "x.y_z",
            &"n".repeat(128),
        ] {
            assert!(is_valid_volume_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".",
            "..",
            "a b",
            "a/b",
            "a@b",
            "é",
            &"n".repeat(129),
        ] {
            assert!(!is_valid_volume_name(bad), "{bad}");
        }
    }
}
