//! `dump` and `restore` of a pool's metadata in a readable text form (JSON,
//! described in docs/FORMAT.md section 9), as `thin_dump` / `thin_restore`
//! do for dm-thin: for support, for inspecting a pool by eye, and as a way
//! back when metadata is lost while the data area is intact.
//!
//! A dump holds what the metadata means (pool geometry and policy, every
//! volume with its relations and its mapping after journal replay), plus,
//! under `on_disk`, where it happened to be stored. `restore` writes the
//! meaning back to fresh blocks, so after a restore only the `on_disk`
//! parts differ.

use crate::admin::check::{check, torn_tail};
use crate::admin::jsontext::{self, write_str, Value};
use crate::alloc::space::{Cursor, SpaceMap};
use crate::dev::read_blocks;
use crate::dev::{read_block, write_blocks, BlockDevice, OverlayDevice};
use crate::error::{Error, Result};
use crate::format::catalog::{
    encode_catalog, encode_volume_header, flags, CatalogBlock, VolumeHeader, VolumeRecord,
    RECORDS_PER_BLOCK,
};
use crate::format::claims;
use crate::format::journal::{
    decode_block, decode_host_checkpoint, encode_host_checkpoint, HostCheckpoint,
};
use crate::format::node::{
    self, Child, Extent, Node, NodeAddr, EXTENT_ZERO, MAX_EXTENT_BLOCKS, NODE_CAPACITY,
};
use crate::format::superblock::{Policy, SharedParams, Superblock};
use crate::format::{format_uuid, SINGLE_HOST_ID};
use crate::format::{
    Layout, BLOCK_SIZE, HOST_CHECKPOINT_BLOCKS, MAX_BLOCKS, MAX_VOLUME_BYTES, SUPERBLOCK_A,
    SUPERBLOCK_B,
};
use crate::load::load;
use crate::util::{journal_seed, now_unix};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::sync::Arc;

/// First line of every dump (`"format"`), and its version.
pub const DUMP_FORMAT: &str = "thinlun-metadata-dump";
pub const DUMP_VERSION: u64 = 1;

/// A pool's metadata as `dump` writes it and `restore` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataDump {
    pub pool: PoolDump,
    /// In id order.
    pub volumes: Vec<VolumeDump>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDump {
    pub uuid: [u8; 16],
    pub pool_blocks: u64,
    pub max_pool_blocks: u64,
    pub chunk_blocks: u32,
    /// Allocation-group size.
    pub ag_blocks: u32,
    pub max_hosts: u32,
    pub journal_blocks: u32,
    /// Lease I/O timeout of a shared pool; 0 for a single-host pool.
    pub io_timeout_ms: u32,
    pub next_volume_id: u64,
    pub created_unix: u64,
    pub policy: Policy,
    pub on_disk: PoolOnDisk,
}

/// Where and when the dumped superblock was written; `restore` writes new
/// values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolOnDisk {
    pub generation: u64,
    pub catalog_root: u64,
    pub commit_unix: u64,
    /// Journal blocks replayed into the dumped mappings.
    pub journal_blocks_replayed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDump {
    pub id: u64,
    /// The catalog name (for a snapshot, the part after `@`).
    pub name: String,
    pub flags: u32,
    pub size_bytes: u64,
    pub parent_id: u64,
    pub origin_id: u64,
    pub created_unix: u64,
    pub active_host: u16,
    /// In virtual order, as the mapping tree holds them.
    pub extents: Vec<Extent>,
    pub on_disk: VolumeOnDisk,
}

/// Where the dumped volume's header pair and tree were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeOnDisk {
    pub header_blocks: [u64; 2],
    pub generation: u64,
    pub root: u64,
    /// The root's second copy (0: single-copy nodes; absent in dumps made
    /// before ditto nodes).
    pub root_twin: u64,
    pub depth: u16,
    pub journal_seq: u64,
    pub journal_host: u32,
}

impl MetadataDump {
    pub fn layout(&self) -> Layout {
        let p = &self.pool;
        Layout::compute_with_groups(
            p.pool_blocks,
            p.max_pool_blocks,
            p.chunk_blocks,
            p.ag_blocks,
            p.max_hosts,
            p.journal_blocks,
        )
    }

    /// The dump without its `on_disk` parts: what a restore must keep.
    pub fn meaning(&self) -> MetadataDump {
        let mut d = self.clone();
        d.pool.on_disk = PoolOnDisk::default();
        for v in &mut d.volumes {
            v.on_disk = VolumeOnDisk::default();
        }
        d
    }
}

/// Reads the pool's metadata (replaying the journal in memory, writing
/// nothing). Fails if the pool does not load: `check` says why.
pub fn dump(dev: &dyn BlockDevice, label: &str) -> Result<MetadataDump> {
    let l = load(dev, label, SINGLE_HOST_ID, crate::util::boot_id())?;
    // A dump lists extents; one of a damaged tree would omit what the
    // unreadable node mapped, and a restore of it would read zeros there.
    if let Some(v) = l.state.volumes.values().find(|v| !v.damage.is_empty()) {
        return Err(crate::map::state::damaged_error(&l.state, v, "dump"));
    }
    let sb = &l.state.sb;
    let layout = sb.layout;
    let volumes = l
        .state
        .volumes
        .values()
        .map(|v| {
            let mut extents = Vec::with_capacity(v.map.extent_count() as usize);
            v.map.for_each(|e| extents.push(*e));
            VolumeDump {
                id: v.rec.id,
                name: v.rec.name.clone(),
                flags: v.rec.flags,
                size_bytes: v.rec.size_bytes,
                parent_id: v.rec.parent_id,
                origin_id: v.rec.origin_id,
                created_unix: v.rec.created_unix,
                active_host: v.rec.active_host,
                extents,
                on_disk: VolumeOnDisk {
                    header_blocks: v.rec.header_blocks,
                    generation: v.header.generation,
                    root: v.header.root.block,
                    root_twin: v.header.root.twin,
                    depth: v.header.depth,
                    journal_seq: v.header.journal_seq,
                    journal_host: v.header.journal_host,
                },
            }
        })
        .collect();
    Ok(MetadataDump {
        pool: PoolDump {
            uuid: sb.uuid,
            pool_blocks: layout.pool_blocks,
            max_pool_blocks: layout.max_pool_blocks,
            chunk_blocks: layout.chunk_blocks,
            ag_blocks: layout.ag_blocks,
            max_hosts: layout.max_hosts,
            journal_blocks: layout.journal_blocks,
            io_timeout_ms: sb.shared.map_or(0, |s| s.io_timeout_ms),
            next_volume_id: sb.next_volume_id,
            created_unix: sb.created_unix,
            policy: sb.policy,
            on_disk: PoolOnDisk {
                generation: sb.generation,
                catalog_root: sb.catalog_root,
                commit_unix: sb.commit_unix,
                journal_blocks_replayed: l.replayed_blocks,
            },
        },
        volumes,
    })
}

// --- text form ------------------------------------------------------------

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

    /// The name users address a volume by (`vol@snap` for a snapshot).
    fn full_name(&self, v: &VolumeDump) -> String {
        if v.flags & flags::SNAPSHOT != 0 {
            let parent = self
                .volumes
                .iter()
                .find(|p| p.id == v.parent_id)
                .map_or("?", |p| p.name.as_str());
            format!("{parent}@{}", v.name)
        } else {
            v.name.clone()
        }
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
        // The geometry must be one a superblock can hold.
        let probe = Superblock {
            generation: 1,
            layout: Layout::compute_with_groups(
                pool.pool_blocks,
                pool.max_pool_blocks,
                pool.chunk_blocks,
                pool.ag_blocks,
                pool.max_hosts,
                pool.journal_blocks,
            ),
            uuid: pool.uuid,
            catalog_root: 0,
            next_volume_id: pool.next_volume_id,
            created_unix: 0,
            commit_unix: 0,
            policy,
            ditto_nodes: DITTO,
            shared: (pool.io_timeout_ms != 0).then_some(SharedParams {
                io_timeout_ms: pool.io_timeout_ms,
            }),
        };
        if pool.max_pool_blocks > MAX_BLOCKS {
            return Err("pool: max_pool_blocks out of range".into());
        }
        Superblock::decode(&probe.encode(SUPERBLOCK_A), SUPERBLOCK_A)
            .map_err(|e| format!("pool geometry is not valid: {e}"))?;
        let layout = probe.layout;
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

    /// Everything the loader would refuse, refused before anything is written.
    fn validate(&self) -> std::result::Result<(), String> {
        let layout = self.layout();
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let mut prev_id = 0;
        for v in &self.volumes {
            let ctx = format!("volume {} ('{}')", v.id, v.name);
            if v.id == 0 || v.id >= self.pool.next_volume_id {
                return Err(format!(
                    "{ctx}: id must be 1..next_volume_id ({})",
                    self.pool.next_volume_id
                ));
            }
            if v.id <= prev_id {
                return Err(format!(
                    "{ctx}: volumes must be listed in ascending id order"
                ));
            }
            prev_id = v.id;
            ids.insert(v.id);
            if !crate::format::names::is_valid_volume_name(&v.name) {
                return Err(format!("{ctx}: invalid name"));
            }
            if v.flags & !flags::KNOWN != 0 {
                return Err(format!("{ctx}: unknown flags"));
            }
            let scope = if v.flags & flags::SNAPSHOT != 0 {
                v.parent_id
            } else {
                0
            };
            if !names.insert((scope, v.name.clone())) {
                return Err(format!("{ctx}: name used twice"));
            }
            if v.size_bytes == 0
                || v.size_bytes > MAX_VOLUME_BYTES
                || !v.size_bytes.is_multiple_of(BLOCK_SIZE as u64)
            {
                return Err(format!("{ctx}: size out of range"));
            }
            if v.flags & flags::SNAPSHOT != 0 && v.parent_id == 0 {
                return Err(format!("{ctx}: a snapshot needs a parent_id"));
            }
            let end = v.size_bytes / BLOCK_SIZE as u64;
            let mut prev_end = 0;
            for (k, e) in v.extents.iter().enumerate() {
                let ectx = format!("{ctx}, extent {k} [{}, {}, {}]", e.vblock, e.pblock, e.len);
                if e.len == 0 || e.len as u64 > MAX_EXTENT_BLOCKS {
                    return Err(format!("{ectx}: length must be 1..={MAX_EXTENT_BLOCKS}"));
                }
                if k > 0 && e.vblock < prev_end {
                    return Err(format!("{ectx}: overlaps or is out of order"));
                }
                if e.vblock > end || e.len as u64 > end - e.vblock {
                    return Err(format!("{ectx}: lies past the end of the volume"));
                }
                prev_end = e.vend();
                let in_data = layout.is_data_block(e.pblock)
                    && layout.is_data_block(e.pblock + e.len as u64 - 1);
                if !e.is_zero() && !in_data {
                    return Err(format!("{ectx}: outside the pool's data area"));
                }
            }
        }
        for v in &self.volumes {
            for (what, id) in [("parent_id", v.parent_id), ("origin_id", v.origin_id)] {
                if id != 0 && !ids.contains(&id) {
                    return Err(format!(
                        "volume {} ('{}'): {what} {id} is not in the dump",
                        v.id, v.name
                    ));
                }
            }
        }
        Ok(())
    }
}

fn mapped_blocks(extents: &[Extent]) -> u64 {
    extents
        .iter()
        .filter(|e| !e.is_zero())
        .map(|e| e.len as u64)
        .sum()
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

// --- restore --------------------------------------------------------------

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Restore over a pool that still opens, or one of another identity.
    pub force: bool,
    /// Build and verify everything in memory, write nothing.
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Volumes restored, snapshots apart (as `PoolStatus::volumes`).
    pub volumes: u64,
    pub snapshots: u64,
    pub extents: u64,
    /// Metadata blocks the restored pool uses (catalog, headers, nodes).
    pub metadata_blocks: u64,
    /// The new superblock generation.
    pub generation: u64,
    /// Blocks written to the LUN (0 on a dry run).
    pub blocks_written: u64,
    /// What the target held before, in words.
    pub notes: Vec<String>,
}

/// Hands out data-area blocks that hold neither dumped data nor metadata
/// the target still uses, lowest first.
/// Where restore puts the new metadata: data-area blocks nothing kept
/// holds, second copies away from the first.
/// A restored pool is written in the current format: with ditto nodes,
/// whatever the dumped pool had (so restore also converts an older pool).
const DITTO: bool = true;

struct Alloc {
    space: SpaceMap,
    first: Cursor,
    second: Cursor,
}

impl Alloc {
    fn new(keep: Vec<(u64, u64)>, layout: &Layout) -> Alloc {
        let mut space = SpaceMap::new(layout);
        let mut overlap = Vec::new();
        for (s, e) in keep {
            let (s, e) = (s.max(layout.data_start), e.min(layout.data_end()));
            if s < e {
                overlap.clear();
                space.mark_or_share(s, e - s, &mut overlap);
            }
        }
        Alloc {
            space,
            first: Cursor::default(),
            second: Cursor::default(),
        }
    }

    fn take(&mut self) -> Result<u64> {
        let run = self.space.allocate_run(&mut self.first, 1);
        run.map(|(b, _)| b).ok_or(Error::NoSpace)
    }

    /// Two blocks in different chunks, far apart (both copies of a record).
    fn take_pair(&mut self) -> Result<NodeAddr> {
        let (block, twin) = self
            .space
            .allocate_pair(&mut self.first, &mut self.second)
            .ok_or(Error::NoSpace)?;
        Ok(NodeAddr { block, twin })
    }
}

fn same_geometry(a: &Layout, b: &Layout) -> bool {
    (
        a.pool_blocks,
        a.max_pool_blocks,
        a.chunk_blocks,
        a.ag_blocks,
        a.max_hosts,
        a.journal_blocks,
    ) == (
        b.pool_blocks,
        b.max_pool_blocks,
        b.chunk_blocks,
        b.ag_blocks,
        b.max_hosts,
        b.journal_blocks,
    )
}

fn describe(l: &Layout) -> String {
    format!(
        "{} blocks (growth limit {}), chunk {} blocks, {} hosts, journal {} blocks per host",
        l.pool_blocks, l.max_pool_blocks, l.chunk_blocks, l.max_hosts, l.journal_blocks
    )
}

/// Highest generation among the valid copies of a host checkpoint, and the
/// highest journal sequence number in the host's ring.
fn host_state(dev: &dyn BlockDevice, layout: &Layout, host: u32) -> Result<(Option<u64>, u64)> {
    let region = layout.host_region(host);
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    let blocks: Vec<u64> = (region..region + layout.journal_blocks as u64).collect();
    let bufs = read_blocks(dev, &blocks, "reading journal")?;
    let mut gen = None;
    for k in 0..HOST_CHECKPOINT_BLOCKS as usize {
        if let Ok(c) = decode_host_checkpoint(&bufs[k], blocks[k], ring_len) {
            gen = gen.max(Some(c.generation));
        }
    }
    let mut max_seq = 0;
    for k in HOST_CHECKPOINT_BLOCKS as usize..blocks.len() {
        if let Ok(Some((jb, _))) = decode_block(&bufs[k], blocks[k]) {
            max_seq = max_seq.max(jb.seq);
        }
    }
    Ok((gen, max_seq))
}

/// Writes the dump's metadata onto `dev` (which the caller holds
/// exclusively): new mapping trees, volume headers and catalog in free
/// blocks of the data area, a new superblock generation, a fresh journal
/// start for host 1. Everything is built and verified on an in-memory
/// overlay first (it must load, check clean, and dump back to the same
/// meaning); only then is it written, in the engine's update order.
///
/// Refused, with nothing written: a dump of another geometry than the
/// pool on `dev`; without `force`, a target that still opens or belongs
/// to another pool (uuid).
pub fn restore(
    dev: Arc<dyn BlockDevice>,
    label: &str,
    d: &MetadataDump,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    d.validate()
        .map_err(|e| Error::InvalidArgument(format!("metadata dump: {e}")))?;
    if d.pool.io_timeout_ms != 0 {
        // Every host's journal and the group claims would need resetting
        // too; until restore knows how, it refuses rather than guesses.
        return Err(Error::InvalidArgument(
            "the dump is of a shared pool; restore supports single-host pools only".into(),
        ));
    }
    let layout = d.layout();
    let mut report = RestoreReport::default();
    let size = dev.size_bytes().map_err(|e| Error::io(label, e))?;
    let need = layout.pool_blocks * BLOCK_SIZE as u64;
    if size < need {
        return Err(Error::InvalidArgument(format!(
            "{label} is {size} bytes; the dumped pool needs {need}"
        )));
    }

    // What the target holds now.
    let mut keep: Vec<(u64, u64)> = Vec::new();
    let mut old_gen = d.pool.on_disk.generation;
    let mut target_sbs = Vec::new();
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        let b = read_block(dev.as_ref(), at).map_err(|e| Error::io(label, e))?;
        if let Ok(sb) = Superblock::decode(&b, at) {
            target_sbs.push(sb);
        }
    }
    for sb in &target_sbs {
        if !same_geometry(&sb.layout, &layout) {
            return Err(Error::InvalidArgument(format!(
                "the dump is of a pool with another geometry ({}) than {label} ({}); refusing",
                describe(&layout),
                describe(&sb.layout)
            )));
        }
        if sb.uuid != d.pool.uuid && !opts.force {
            return Err(Error::InvalidArgument(format!(
                "the dump is of pool {} but {label} holds pool {}; use --force to restore anyway",
                format_uuid(&d.pool.uuid),
                format_uuid(&sb.uuid)
            )));
        }
        old_gen = old_gen.max(sb.generation);
    }
    match load(dev.as_ref(), label, SINGLE_HOST_ID, crate::util::boot_id()) {
        Ok(l) => {
            if !opts.force {
                return Err(Error::busy(crate::BusyKind::NeedsForce, format!(
                    "{label} holds a pool that opens without errors ({} volumes); restoring replaces its metadata with the dump's (changes since the dump are lost): use --force",
                    l.state.volumes.len()
                )));
            }
            report.notes.push(format!(
                "{label} held a working pool ({} volumes); its metadata is replaced",
                l.state.volumes.len()
            ));
            // Its metadata stays untouched until the new superblock is
            // durable, so a crash during the restore leaves it intact.
            keep.extend(l.state.metadata_block_set().into_iter().map(|b| (b, b + 1)));
        }
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => report
            .notes
            .push(format!("{label} did not open before the restore ({e})")),
    }
    if target_sbs.is_empty() {
        report
            .notes
            .push("no valid superblock was found; the dump's geometry is used".into());
    }

    for v in &d.volumes {
        for e in v.extents.iter().filter(|e| !e.is_zero()) {
            keep.push((e.pblock, e.pblock + e.len as u64));
        }
    }
    let mut alloc = Alloc::new(keep, &layout);

    // Host 1's journal restarts past every sequence number in its ring, so
    // no old block can be replayed over the restored trees; every header
    // says its tree holds everything up to there.
    let (ck_gen, max_seq) = host_state(dev.as_ref(), &layout, SINGLE_HOST_ID)?;
    let journal_seq = max_seq.max(1);
    let host_ckpt = HostCheckpoint {
        generation: ck_gen.unwrap_or(0) + 1,
        head: 0,
        seq: journal_seq + 1,
        prev_crc: journal_seed(&d.pool.uuid, SINGLE_HOST_ID),
    };

    let mut first: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut records = Vec::new();
    for v in &d.volumes {
        let mut children = Vec::new();
        for (i, chunk) in v.extents.chunks(NODE_CAPACITY).enumerate() {
            let at = alloc.take_pair()?;
            let key = if i == 0 { 0 } else { chunk[0].vblock };
            let leaf = Node::Leaf(chunk.to_vec());
            first.extend(node::encode_copies(&leaf, v.id, journal_seq, at));
            children.push(Child { key, at });
        }
        let mut interior = Vec::new();
        let (root, depth) = node::build_interior(
            children,
            DITTO,
            || alloc.take_pair(),
            |at, n| interior.push((at, n)),
        )?;
        for (at, n) in interior {
            first.extend(node::encode_copies(&n, v.id, journal_seq, at));
        }
        let header = VolumeHeader {
            volume_id: v.id,
            generation: 1,
            root,
            depth,
            mapped_blocks: mapped_blocks(&v.extents),
            extent_count: v.extents.len() as u64,
            journal_seq,
            journal_host: SINGLE_HOST_ID,
        };
        let pair = alloc.take_pair()?;
        let hb = [pair.block, pair.twin];
        for at in hb {
            first.push((at, encode_volume_header(&header, at)));
        }
        records.push(VolumeRecord {
            id: v.id,
            flags: v.flags,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            header_blocks: hb,
            parent_id: v.parent_id,
            origin_id: v.origin_id,
            created_unix: v.created_unix,
            active_host: v.active_host,
            active_gen: 0,
        });
        report.extents += v.extents.len() as u64;
    }
    let generation = old_gen + 1;
    let nblocks = records.len().div_ceil(RECORDS_PER_BLOCK);
    let cat_blocks = (0..nblocks)
        .map(|_| alloc.take())
        .collect::<Result<Vec<u64>>>()?;
    for (i, recs) in records.chunks(RECORDS_PER_BLOCK).enumerate() {
        let cb = CatalogBlock {
            records: recs.to_vec(),
            next: cat_blocks.get(i + 1).copied().unwrap_or(0),
        };
        first.push((
            cat_blocks[i],
            encode_catalog(&cb, generation, cat_blocks[i]),
        ));
    }
    report.metadata_blocks = first.len() as u64;
    // Reserved structures the loader and check verify: a damaged AG table
    // block becomes an empty one (v1 never claims groups); a host without
    // a valid checkpoint gets a fresh one past its ring's sequences.
    for i in 0..layout.ag_table_blocks {
        let at = layout.ag_table_start + i;
        let b = read_block(dev.as_ref(), at).map_err(|e| Error::io(label, e))?;
        if claims::decode(&b, at, layout.max_hosts).is_err() {
            let empty = vec![claims::Claim::default(); claims::CLAIMS_PER_BLOCK];
            first.push((at, claims::encode(&empty, 1, at)));
        }
    }
    let ring_len = layout.journal_blocks - HOST_CHECKPOINT_BLOCKS;
    for host in 1..=layout.max_hosts {
        if host == SINGLE_HOST_ID {
            continue;
        }
        let region = layout.host_region(host);
        let mut valid = 0;
        for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
            let b = read_block(dev.as_ref(), region + k).map_err(|e| Error::io(label, e))?;
            valid += decode_host_checkpoint(&b, region + k, ring_len).is_ok() as u32;
        }
        if valid < HOST_CHECKPOINT_BLOCKS {
            let (gen, seq) = host_state(dev.as_ref(), &layout, host)?;
            let ck = HostCheckpoint {
                generation: gen.unwrap_or(0) + 1,
                head: 0,
                seq: seq + 1,
                prev_crc: journal_seed(&d.pool.uuid, host),
            };
            for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
                first.push((region + k, encode_host_checkpoint(&ck, region + k)));
            }
        }
    }
    // Host slots and lock registers, unused on a single-host pool: a
    // damaged one (random bytes from a stray dd) becomes never-used again.
    for dl in crate::admin::check::damaged_lease_blocks(dev.as_ref(), &layout)? {
        first.push((dl.block, vec![0u8; BLOCK_SIZE]));
    }
    let sb = Superblock {
        generation,
        layout,
        uuid: d.pool.uuid,
        catalog_root: cat_blocks.first().copied().unwrap_or(0),
        next_volume_id: d.pool.next_volume_id,
        created_unix: d.pool.created_unix,
        commit_unix: now_unix(),
        policy: d.pool.policy,
        shared: None,
        ditto_nodes: DITTO,
    };

    // Build on the overlay in protocol order: new blocks, flush, superblock
    // copies, then the host checkpoint that starts the new journal.
    let ov = Arc::new(OverlayDevice::new(dev.clone()));
    let io = |e| Error::io(format!("{label}: restoring metadata"), e);
    for batch in first.chunks(1024) {
        write_blocks(ov.as_ref(), batch).map_err(io)?;
    }
    // A torn block where the new journal starts would read as an
    // interrupted commit: clear it.
    let ring0 = layout.host_region(SINGLE_HOST_ID) + HOST_CHECKPOINT_BLOCKS as u64;
    if torn_tail(ov.as_ref(), &layout, 0)?.is_some() {
        write_blocks(ov.as_ref(), &[(ring0, vec![0u8; BLOCK_SIZE])]).map_err(io)?;
    }
    ov.flush().map_err(io)?;
    for at in [SUPERBLOCK_A, SUPERBLOCK_B] {
        write_blocks(ov.as_ref(), &[(at, sb.encode(at))]).map_err(io)?;
        ov.flush().map_err(io)?;
    }
    let region = layout.host_region(SINGLE_HOST_ID);
    for k in 0..HOST_CHECKPOINT_BLOCKS as u64 {
        write_blocks(
            ov.as_ref(),
            &[(region + k, encode_host_checkpoint(&host_ckpt, region + k))],
        )
        .map_err(io)?;
        ov.flush().map_err(io)?;
    }

    // Verify before touching the LUN.
    let after = check(ov.as_ref(), label)?;
    let problems: Vec<&String> = after.errors.iter().chain(&after.warnings).collect();
    if let Some(first) = problems.first() {
        for p in &problems {
            log::debug!("{label}: restored metadata: {p}");
        }
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        return Err(Error::Corrupt(format!(
            "the restored metadata did not verify ({first}{more}); nothing was written"
        )));
    }
    let back = dump(ov.as_ref(), label)?;
    if back.meaning() != d.meaning() {
        return Err(Error::Corrupt(
            "the restored metadata reads back differently from the dump; nothing was written"
                .into(),
        ));
    }
    report.snapshots = d
        .volumes
        .iter()
        .filter(|v| v.flags & flags::SNAPSHOT != 0)
        .count() as u64;
    report.volumes = d.volumes.len() as u64 - report.snapshots;
    report.generation = generation;
    if !opts.dry_run {
        report.blocks_written = ov.apply().map_err(io)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;
    use crate::format::magic;
    use crate::{Pool, PoolConfig};

    const MIB: u64 = 1 << 20;

    fn sample() -> (Arc<MemDevice>, Vec<(String, Vec<u8>)>) {
        let mem = Arc::new(MemDevice::new(64 * MIB));
        let pool = Pool::create(mem.clone(), "t", &PoolConfig::default()).unwrap();
        pool.create_volume("vm-1", 8 * MIB).unwrap();
        let v = pool.open_volume("vm-1").unwrap();
        // Many small extents so the tree has several leaves and a root.
        for i in 0..600u64 {
            v.write(i * 16, &[(i % 251) as u8 + 1; 4096]).unwrap();
        }
        v.flush().unwrap();
        drop(v);
        pool.create_snapshot("vm-1@s1").unwrap();
        let v = pool.open_volume("vm-1").unwrap();
        v.write(0, &[0xee; 8192]).unwrap();
        v.flush().unwrap();
        drop(v);
        pool.clone_volume("vm-1@s1", "clone-1").unwrap();
        let c = pool.open_volume("clone-1").unwrap();
        c.write(8 * 16, &[0x77; 4096]).unwrap();
        c.flush().unwrap();
        drop(c);
        pool.create_volume("empty", 4 * MIB).unwrap();
        let names: Vec<String> = pool.volumes().into_iter().map(|i| i.name).collect();
        let mut contents = Vec::new();
        for n in names {
            let v = pool.open_volume(&n).unwrap();
            let mut buf = vec![0u8; v.size_bytes() as usize];
            v.read(0, &mut buf).unwrap();
            contents.push((n, buf));
        }
        pool.close().unwrap();
        (mem, contents)
    }

    /// Zeroes every metadata record: the header zone, host and journal
    /// regions, and every catalog, header and node block in the data area.
    fn wipe_metadata(mem: &MemDevice, layout: &Layout) -> Vec<u8> {
        let mut img = mem.image();
        let bs = BLOCK_SIZE;
        img[..layout.data_start as usize * bs].fill(0);
        for blk in img.chunks_mut(bs) {
            let m = &blk[0..8];
            if m == magic::NODE || m == magic::CATALOG || m == magic::VOLUME_HEADER {
                blk.fill(0);
            }
        }
        img
    }

    fn read_all(dev: Arc<MemDevice>) -> Vec<(String, Vec<u8>)> {
        let pool = Pool::open(dev, "t", &Default::default()).unwrap();
        let mut out = Vec::new();
        for i in pool.volumes() {
            let v = pool.open_volume(&i.name).unwrap();
            let mut buf = vec![0u8; v.size_bytes() as usize];
            v.read(0, &mut buf).unwrap();
            out.push((i.name, buf));
        }
        pool.close().unwrap();
        out
    }

    #[test]
    fn text_round_trip_and_restore_onto_wiped_metadata() {
        let (mem, contents) = sample();
        let d = dump(mem.as_ref(), "t").unwrap();
        assert_eq!(d.volumes.len(), 4, "vm-1, vm-1@s1, clone-1, empty");
        assert!(d.volumes.iter().any(|v| v.extents.len() > NODE_CAPACITY));
        let text = d.to_json();
        assert_eq!(MetadataDump::from_json(&text).unwrap(), d);

        let wiped = Arc::new(MemDevice::from_image(wipe_metadata(&mem, &d.layout())));
        assert!(Pool::open(wiped.clone(), "t", &Default::default()).is_err());
        let r = restore(wiped.clone(), "t", &d, &RestoreOptions::default()).unwrap();
        assert_eq!((r.volumes, r.snapshots), (3, 1));
        assert!(r.blocks_written > 0);
        let c = check(wiped.as_ref(), "t").unwrap();
        assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
        assert_eq!(read_all(wiped.clone()), contents);
        // dump -> restore -> dump: the same but for the on_disk parts.
        let again = dump(wiped.as_ref(), "t").unwrap();
        assert_eq!(again.meaning(), d.meaning());
        assert_ne!(again.pool.on_disk, d.pool.on_disk);
    }

    #[test]
    fn restore_refuses_working_pool_other_geometry_and_bad_dumps() {
        let (mem, _) = sample();
        let d = dump(mem.as_ref(), "t").unwrap();
        let before = mem.image();
        // A pool that opens needs --force.
        let e = restore(mem.clone(), "t", &d, &RestoreOptions::default()).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(mem.image() == before);
        // Another geometry is refused even with force.
        let other = Arc::new(MemDevice::new(64 * MIB));
        let cfg = PoolConfig {
            chunk_bytes: 256 << 10,
            ..PoolConfig::default()
        };
        Pool::create(other.clone(), "o", &cfg)
            .unwrap()
            .close()
            .unwrap();
        let other_before = other.image();
        let opts = RestoreOptions {
            force: true,
            dry_run: false,
        };
        let e = restore(other.clone(), "o", &d, &opts).unwrap_err();
        assert!(e.to_string().contains("geometry"), "{e}");
        assert!(other.image() == other_before);
        // With force onto the same pool: works, data unchanged.
        let contents = read_all(Arc::new(MemDevice::from_image(before.clone())));
        restore(mem.clone(), "t", &d, &opts).unwrap();
        assert_eq!(read_all(mem.clone()), contents);

        // Dumps that contradict themselves are refused when parsed.
        let text = d.to_json();
        let pblock = d.volumes[0].extents[0].pblock;
        for (from, to) in [
            ("\"format\": \"thinlun-metadata-dump\"", "\"format\": \"x\""),
            ("\"chunk_blocks\": 256", "\"chunk_blocks\": 100"),
            ("\"name\": \"vm-1\"", "\"name\": \"-bad\""),
            (
                &format!("[0, {pblock}, "),
                &format!("[0, {}, ", d.layout().data_end()),
            ),
            ("\"extent_count\": ", "\"extent_count\": 9"),
        ] {
            let edited = text.replacen(from, to, 1);
            assert_ne!(edited, text, "{from}");
            assert!(MetadataDump::from_json(&edited).is_err(), "{from} -> {to}");
        }
        // Truncated dumps never panic.
        for cut in (0..text.len()).step_by(997) {
            assert!(MetadataDump::from_json(&text[..cut]).is_err());
        }
    }

    #[test]
    fn uuid_text_round_trips() {
        let u = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";
        assert_eq!(parse_uuid(&format_uuid(&u)).unwrap(), u);
        assert!(parse_uuid("0011223344556677-8899-aabb-ccdd-eeff0").is_err());
        assert!(parse_uuid("zz112233-4455-6677-8899-aabbccddeeff").is_err());
    }
}
