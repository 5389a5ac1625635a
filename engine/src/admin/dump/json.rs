//! The dump's text form (docs/FORMAT.md section 9): [`MetadataDump::to_json`]
//! and [`MetadataDump::from_json`].

use super::model::{mapped_blocks, MetadataDump, PoolDump, PoolOnDisk, VolumeDump, VolumeOnDisk};
use super::{DUMP_FORMAT, DUMP_VERSION};
use crate::admin::jsontext::{self, write_str, Value};
use crate::error::{Error, Result};
use crate::format::catalog::flags;
use crate::format::format_uuid;
use crate::format::node::{Extent, EXTENT_ZERO, MAX_EXTENT_BLOCKS};
use crate::format::superblock::Policy;
use crate::format::{BLOCK_SIZE, MAX_BLOCKS};
use std::collections::HashMap;
use std::fmt::Write;

const FLAG_NAMES: [(u32, &str); 3] = [
    (flags::SNAPSHOT, "snapshot"),
    (flags::BASE, "base"),
    (flags::READ_ONLY, "read_only"),
];

impl MetadataDump {
    /// The JSON text: stable key order, one extent per line.
    pub fn to_json(&self) -> String {
        let p = &self.pool;
        let l = self.layout();
        let mut o = String::new();
        let names: HashMap<u64, String> = self
            .volumes
            .iter()
            .map(|v| (v.id, self.full_name(v)))
            .collect();
        let _ = writeln!(o, "{{");
        let _ = writeln!(o, "  \"format\": \"{DUMP_FORMAT}\",");
        let _ = writeln!(o, "  \"version\": {DUMP_VERSION},");
        let _ = writeln!(o, "  \"pool\": {{");
        let _ = writeln!(o, "    \"uuid\": \"{}\",", format_uuid(&p.uuid));
        let _ = writeln!(o, "    \"block_size\": {BLOCK_SIZE},");
        let _ = writeln!(o, "    \"pool_blocks\": {},", p.pool_blocks);
        let _ = writeln!(o, "    \"max_pool_blocks\": {},", p.max_pool_blocks);
        let _ = writeln!(o, "    \"chunk_blocks\": {},", p.chunk_blocks);
        let _ = writeln!(o, "    \"ag_blocks\": {},", p.ag_blocks);
        let _ = writeln!(o, "    \"max_hosts\": {},", p.max_hosts);
        let _ = writeln!(o, "    \"journal_blocks\": {},", p.journal_blocks);
        let _ = writeln!(o, "    \"io_timeout_ms\": {},", p.io_timeout_ms);
        let _ = writeln!(o, "    \"data_start\": {},", l.data_start);
        let _ = writeln!(o, "    \"data_end\": {},", l.data_end());
        let _ = writeln!(o, "    \"next_volume_id\": {},", p.next_volume_id);
        let _ = writeln!(o, "    \"created_unix\": {},", p.created_unix);
        let pct = |a: [u8; 3]| format!("[{}, {}, {}]", a[0], a[1], a[2]);
        let _ = writeln!(o, "    \"policy\": {{");
        let _ = writeln!(
            o,
            "      \"data_warn_pct\": {},",
            pct(p.policy.data_warn_pct)
        );
        let _ = writeln!(
            o,
            "      \"meta_warn_pct\": {},",
            pct(p.policy.meta_warn_pct)
        );
        let _ = writeln!(o, "      \"when_full\": {},", p.policy.when_full);
        let _ = writeln!(
            o,
            "      \"queue_timeout_ms\": {},",
            p.policy.queue_timeout_ms
        );
        let _ = writeln!(
            o,
            "      \"max_overcommit_pct\": {}",
            p.policy.max_overcommit_pct
        );
        let _ = writeln!(o, "    }},");
        let d = &p.on_disk;
        let _ = writeln!(
            o,
            "    \"on_disk\": {{\"generation\": {}, \"catalog_root\": {}, \"commit_unix\": {}, \"journal_blocks_replayed\": {}}}",
            d.generation, d.catalog_root, d.commit_unix, d.journal_blocks_replayed
        );
        let _ = writeln!(o, "  }},");
        let _ = write!(o, "  \"volumes\": [");
        for (i, v) in self.volumes.iter().enumerate() {
            o.push_str(if i == 0 { "\n" } else { ",\n" });
            let _ = writeln!(o, "    {{");
            let _ = writeln!(o, "      \"id\": {},", v.id);
            o.push_str("      \"name\": ");
            write_str(&mut o, &v.name);
            o.push_str(",\n      \"full_name\": ");
            write_str(&mut o, &names[&v.id]);
            let fl: Vec<String> = FLAG_NAMES
                .iter()
                .filter(|(bit, _)| v.flags & bit != 0)
                .map(|(_, n)| format!("\"{n}\""))
                .collect();
            let _ = writeln!(o, ",\n      \"flags\": [{}],", fl.join(", "));
            let _ = writeln!(o, "      \"size_bytes\": {},", v.size_bytes);
            let _ = writeln!(o, "      \"parent_id\": {},", v.parent_id);
            let _ = writeln!(o, "      \"origin_id\": {},", v.origin_id);
            for (key, id) in [("snapshot_of", v.parent_id), ("clone_of", v.origin_id)] {
                let _ = write!(o, "      \"{key}\": ");
                match names.get(&id) {
                    Some(n) if id != 0 => write_str(&mut o, n),
                    _ => o.push_str("null"),
                }
                o.push_str(",\n");
            }
            let _ = writeln!(o, "      \"created_unix\": {},", v.created_unix);
            let _ = writeln!(o, "      \"active_host\": {},", v.active_host);
            let (mapped, count) = (mapped_blocks(&v.extents), v.extents.len());
            let _ = writeln!(o, "      \"mapped_blocks\": {mapped},");
            let _ = writeln!(o, "      \"extent_count\": {count},");
            let d = &v.on_disk;
            let _ = writeln!(
                o,
                "      \"on_disk\": {{\"header_blocks\": [{}, {}], \"generation\": {}, \"root\": {}, \"root_twin\": {}, \"depth\": {}, \"journal_seq\": {}, \"journal_host\": {}}},",
                d.header_blocks[0], d.header_blocks[1], d.generation, d.root, d.root_twin, d.depth, d.journal_seq, d.journal_host
            );
            o.push_str("      \"extents\": [");
            for (k, e) in v.extents.iter().enumerate() {
                o.push_str(if k == 0 { "\n" } else { ",\n" });
                if e.is_zero() {
                    let _ = write!(o, "        [{}, \"zero\", {}]", e.vblock, e.len);
                } else {
                    let _ = write!(o, "        [{}, {}, {}]", e.vblock, e.pblock, e.len);
                }
            }
            o.push_str(if v.extents.is_empty() {
                "]\n"
            } else {
                "\n      ]\n"
            });
            o.push_str("    }");
        }
        o.push_str(if self.volumes.is_empty() {
            "]\n"
        } else {
            "\n  ]\n"
        });
        o.push_str("}\n");
        o
    }

    /// Parses and validates a dump. Informational fields (`full_name`,
    /// `snapshot_of`, `clone_of`, `data_start`, `data_end`, counts) are
    /// checked where they can contradict the rest, so a hand edit that
    /// leaves them stale is caught rather than half-applied.
    pub fn from_json(text: &str) -> Result<MetadataDump> {
        let bad = |e: String| Error::InvalidArgument(format!("metadata dump: {e}"));
        let doc = jsontext::parse(text).map_err(bad)?;
        Self::from_value(&doc).map_err(bad)
    }

    fn from_value(doc: &Value) -> std::result::Result<MetadataDump, String> {
        if doc.str_field("format", "dump")? != DUMP_FORMAT {
            return Err(format!("not a {DUMP_FORMAT} document"));
        }
        let version = doc.u64_field("version", "dump")?;
        if version != DUMP_VERSION {
            return Err(format!(
                "dump version {version}; this thinlun reads version {DUMP_VERSION}"
            ));
        }
        let p = doc.field("pool", "dump")?;
        let ctx = "pool";
        if p.u64_field("block_size", ctx)? != BLOCK_SIZE as u64 {
            return Err("pool: block_size must be 4096".into());
        }
        let policy_v = p.field("policy", ctx)?;
        let pct = |key: &str| -> std::result::Result<[u8; 3], String> {
            let a = policy_v.arr_field(key, "policy")?;
            let mut out = [0u8; 3];
            if a.len() != 3 {
                return Err(format!("policy: \"{key}\" must have 3 entries"));
            }
            for (o, v) in out.iter_mut().zip(a) {
                *o = match v {
                    Value::Num(n) if *n <= 100 => *n as u8,
                    _ => return Err(format!("policy: \"{key}\" entries must be 0..=100")),
                };
            }
            Ok(out)
        };
        let when_full = policy_v.u64_field("when_full", "policy")?;
        let policy = Policy {
            data_warn_pct: pct("data_warn_pct")?,
            meta_warn_pct: pct("meta_warn_pct")?,
            when_full: u8::try_from(when_full)
                .ok()
                .filter(|w| *w <= 1)
                .ok_or("policy: when_full must be 0 or 1")?,
            queue_timeout_ms: policy_v.u32_field("queue_timeout_ms", "policy")?,
            max_overcommit_pct: policy_v.u32_field("max_overcommit_pct", "policy")?,
        };
        let od = p.field("on_disk", ctx)?;
        let pool = PoolDump {
            uuid: parse_uuid(p.str_field("uuid", ctx)?)?,
            pool_blocks: p.u64_field("pool_blocks", ctx)?,
            max_pool_blocks: p.u64_field("max_pool_blocks", ctx)?,
            chunk_blocks: p.u32_field("chunk_blocks", ctx)?,
            ag_blocks: p.u32_field("ag_blocks", ctx)?,
            max_hosts: p.u32_field("max_hosts", ctx)?,
            journal_blocks: p.u32_field("journal_blocks", ctx)?,
            io_timeout_ms: p.u32_field("io_timeout_ms", ctx)?,
            next_volume_id: p.u64_field("next_volume_id", ctx)?,
            created_unix: p.u64_field("created_unix", ctx)?,
            policy,
            on_disk: PoolOnDisk {
                generation: od.u64_field("generation", "pool on_disk")?,
                catalog_root: od.u64_field("catalog_root", "pool on_disk")?,
                commit_unix: od.u64_field("commit_unix", "pool on_disk")?,
                journal_blocks_replayed: od.u64_field("journal_blocks_replayed", "pool on_disk")?,
            },
        };
        let layout = pool.checked_layout()?;
        if p.u64_field("data_start", ctx)? != layout.data_start
            || p.u64_field("data_end", ctx)? != layout.data_end()
        {
            return Err("pool: data_start/data_end do not match the geometry".into());
        }

        let mut volumes = Vec::new();
        for (i, v) in doc.arr_field("volumes", "dump")?.iter().enumerate() {
            volumes.push(volume_from_value(v, i)?);
        }
        let d = MetadataDump { pool, volumes };
        d.validate()?;
        // Informational names must agree with the ids.
        for (i, v) in doc.arr_field("volumes", "dump")?.iter().enumerate() {
            let vd = &d.volumes[i];
            let ctx = format!("volume {}", vd.id);
            if v.str_field("full_name", &ctx)? != d.full_name(vd) {
                return Err(format!("{ctx}: full_name does not match name and parent"));
            }
            if v.u64_field("mapped_blocks", &ctx)? != mapped_blocks(&vd.extents)
                || v.u64_field("extent_count", &ctx)? != vd.extents.len() as u64
            {
                return Err(format!(
                    "{ctx}: mapped_blocks/extent_count do not match its extents"
                ));
            }
        }
        Ok(d)
    }
}

fn volume_from_value(v: &Value, i: usize) -> std::result::Result<VolumeDump, String> {
    let ctx = format!("volume {i}");
    let ctx = ctx.as_str();
    let mut fl = 0u32;
    for f in v.arr_field("flags", ctx)? {
        let bit = match f {
            Value::Str(s) => FLAG_NAMES.iter().find(|(_, n)| n == s).map(|(b, _)| *b),
            _ => None,
        };
        fl |= bit.ok_or_else(|| format!("{ctx}: unknown flag {f:?}"))?;
    }
    let od = v.field("on_disk", ctx)?;
    let hb = od.arr_field("header_blocks", ctx)?;
    let header_blocks = match hb {
        [Value::Num(a), Value::Num(b)] => [*a, *b],
        _ => return Err(format!("{ctx}: header_blocks must be two numbers")),
    };
    let mut extents = Vec::new();
    for (k, e) in v.arr_field("extents", ctx)?.iter().enumerate() {
        let bad = || format!("{ctx}: extent {k} must be [vblock, pblock or \"zero\", len]");
        let Value::Arr(parts) = e else {
            return Err(bad());
        };
        let (vblock, p, len) = match parts.as_slice() {
            [Value::Num(v), p, Value::Num(n)] => (*v, p, *n),
            _ => return Err(bad()),
        };
        let (pblock, flags) = match p {
            Value::Num(p) => (*p, 0),
            Value::Str(s) if s == "zero" => (0, EXTENT_ZERO),
            _ => return Err(bad()),
        };
        if vblock >= MAX_BLOCKS || pblock >= MAX_BLOCKS || len == 0 || len > MAX_EXTENT_BLOCKS {
            return Err(format!("{ctx}: extent {k} is out of range"));
        }
        extents.push(Extent {
            vblock,
            pblock,
            len: len as u32,
            flags,
        });
    }
    let active_host = v.u64_field("active_host", ctx)?;
    let depth = od.u64_field("depth", ctx)?;
    Ok(VolumeDump {
        id: v.u64_field("id", ctx)?,
        name: v.str_field("name", ctx)?.to_string(),
        flags: fl,
        size_bytes: v.u64_field("size_bytes", ctx)?,
        parent_id: v.u64_field("parent_id", ctx)?,
        origin_id: v.u64_field("origin_id", ctx)?,
        created_unix: v.u64_field("created_unix", ctx)?,
        active_host: u16::try_from(active_host).map_err(|_| format!("{ctx}: bad active_host"))?,
        extents,
        on_disk: VolumeOnDisk {
            header_blocks,
            generation: od.u64_field("generation", ctx)?,
            root: od.u64_field("root", ctx)?,
            root_twin: match od.field("root_twin", ctx) {
                Ok(_) => od.u64_field("root_twin", ctx)?,
                Err(_) => 0,
            },
            depth: u16::try_from(depth).map_err(|_| format!("{ctx}: bad depth"))?,
            journal_seq: od.u64_field("journal_seq", ctx)?,
            journal_host: od.u32_field("journal_host", ctx)?,
        },
    })
}

fn parse_uuid(s: &str) -> std::result::Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    let ok_shape = s.len() == 36
        && s.char_indices()
            .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    if !ok_shape || hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("pool: bad uuid {s:?}"));
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        // Two ASCII hex digits, checked above.
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_round_trips() {
        let u = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";
        assert_eq!(parse_uuid(&format_uuid(&u)).unwrap(), u);
        assert!(parse_uuid("0011223344556677-8899-aabb-ccdd-eeff0").is_err());
        assert!(parse_uuid("zz112233-4455-6677-8899-aabbccddeeff").is_err());
    }
}
