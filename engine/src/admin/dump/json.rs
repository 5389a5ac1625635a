//! The dump's text form (docs/FORMAT.md section 9), through serde:
//! [`MetadataDump::to_json`] and [`MetadataDump::from_json`].
//!
//! The `*Text` types are the document's shape, keys in the documented
//! order, with the derived fields (`full_name`, `data_start`, counts, ...)
//! that the model leaves out; the `on_disk` parts have the model's shape
//! and derive serde in `model.rs`. [`DumpFormatter`] lays the text out as
//! the format shows it. A dump is user input to `restore`: a bad one gives
//! an error naming the field (its path) and the line, never a panic.

use super::model::{mapped_blocks, MetadataDump, PoolDump, PoolOnDisk, VolumeDump, VolumeOnDisk};
use super::{DUMP_FORMAT, DUMP_VERSION};
use crate::error::{Error, Result};
use crate::format::catalog::flags;
use crate::format::format_uuid;
use crate::format::node::{Extent, EXTENT_ZERO, MAX_EXTENT_BLOCKS};
use crate::format::superblock::Policy;
use crate::format::{BLOCK_SIZE, MAX_BLOCKS};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Unexpected, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::{fmt, io};

const FLAG_NAMES: [(u32, &str); 3] = [
    (flags::SNAPSHOT, "snapshot"),
    (flags::BASE, "base"),
    (flags::READ_ONLY, "read_only"),
];

/// The whole document. Written from a borrowed dump (the extents are not
/// copied); read into owned values.
#[derive(Serialize, Deserialize)]
#[serde(expecting = "a metadata dump (an object)")]
struct DumpText<'a> {
    format: Cow<'a, str>,
    version: u64,
    pool: PoolText,
    volumes: Vec<VolumeText<'a>>,
}

/// What is read first, so that another document or another version is
/// named as such rather than by its first field this reader lacks.
#[derive(Deserialize)]
#[serde(expecting = "a metadata dump (an object)")]
struct Header {
    format: String,
    version: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(expecting = "an object")]
struct PoolText {
    uuid: String,
    block_size: u64,
    pool_blocks: u64,
    max_pool_blocks: u64,
    chunk_blocks: u32,
    ag_blocks: u32,
    max_hosts: u32,
    journal_blocks: u32,
    io_timeout_ms: u32,
    data_start: u64,
    data_end: u64,
    next_volume_id: u64,
    created_unix: u64,
    policy: PolicyText,
    on_disk: PoolOnDisk,
}

/// [`Policy`], with numbers wide enough that a value out of its range gets
/// this reader's message rather than serde's.
#[derive(Serialize, Deserialize)]
#[serde(expecting = "an object")]
struct PolicyText {
    #[serde(deserialize_with = "exactly")]
    data_warn_pct: [u64; 3],
    #[serde(deserialize_with = "exactly")]
    meta_warn_pct: [u64; 3],
    when_full: u64,
    queue_timeout_ms: u32,
    max_overcommit_pct: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(expecting = "an object")]
struct VolumeText<'a> {
    id: u64,
    name: Cow<'a, str>,
    full_name: String,
    flags: Vec<Cow<'a, str>>,
    size_bytes: u64,
    parent_id: u64,
    origin_id: u64,
    /// Written for reading; not read (dumps have never been checked for
    /// them).
    #[serde(skip_deserializing)]
    snapshot_of: Option<String>,
    #[serde(skip_deserializing)]
    clone_of: Option<String>,
    created_unix: u64,
    active_host: u16,
    mapped_blocks: u64,
    extent_count: u64,
    on_disk: VolumeOnDisk,
    #[serde(with = "extent_list")]
    extents: Cow<'a, [Extent]>,
}

impl MetadataDump {
    /// The JSON text: stable key order, one extent per line.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        let mut ser = serde_json::Serializer::with_formatter(&mut out, DumpFormatter::default());
        // Writing into memory, with only string keys, cannot fail.
        DumpText::new(self)
            .serialize(&mut ser)
            .expect("a dump serializes");
        out.push(b'\n');
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// Parses and validates a dump. Informational fields (`full_name`,
    /// `data_start`, `data_end`, counts) are checked where they can
    /// contradict the rest, so a hand edit that leaves them stale is caught
    /// rather than half-applied.
    pub fn from_json(text: &str) -> Result<MetadataDump> {
        let bad = |e: String| Error::InvalidArgument(format!("metadata dump: {e}"));
        let header: Header = parse(text).map_err(bad)?;
        if header.format != DUMP_FORMAT {
            return Err(bad(format!("not a {DUMP_FORMAT} document")));
        }
        if let Some(version) = header.version.filter(|&v| v != DUMP_VERSION) {
            return Err(bad(format!(
                "dump version {version}; this thinlun reads version {DUMP_VERSION}"
            )));
        }
        parse::<DumpText>(text)
            .and_then(DumpText::into_dump)
            .map_err(bad)
    }
}

/// `text` as one `T`, or an error with the path of the field it is in
/// (`volumes[2].on_disk.depth: ...`) and serde_json's line and column.
fn parse<'de, T: Deserialize<'de>>(text: &'de str) -> std::result::Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

impl<'a> DumpText<'a> {
    fn new(d: &'a MetadataDump) -> DumpText<'a> {
        let names: HashMap<u64, String> =
            d.volumes.iter().map(|v| (v.id, d.full_name(v))).collect();
        let name_of = |id: u64| names.get(&id).filter(|_| id != 0).cloned();
        let volumes = d
            .volumes
            .iter()
            .map(|v| VolumeText {
                id: v.id,
                name: Cow::Borrowed(&v.name),
                full_name: names[&v.id].clone(),
                flags: FLAG_NAMES
                    .iter()
                    .filter(|(bit, _)| v.flags & bit != 0)
                    .map(|(_, n)| Cow::Borrowed(*n))
                    .collect(),
                size_bytes: v.size_bytes,
                parent_id: v.parent_id,
                origin_id: v.origin_id,
                snapshot_of: name_of(v.parent_id),
                clone_of: name_of(v.origin_id),
                created_unix: v.created_unix,
                active_host: v.active_host,
                mapped_blocks: mapped_blocks(&v.extents),
                extent_count: v.extents.len() as u64,
                on_disk: v.on_disk.clone(),
                extents: Cow::Borrowed(&v.extents),
            })
            .collect();
        DumpText {
            format: Cow::Borrowed(DUMP_FORMAT),
            version: DUMP_VERSION,
            pool: PoolText::new(&d.pool),
            volumes,
        }
    }

    fn into_dump(self) -> std::result::Result<MetadataDump, String> {
        let pool = self.pool.into_pool()?;
        let mut volumes = Vec::with_capacity(self.volumes.len());
        let mut derived = Vec::with_capacity(self.volumes.len());
        for (i, v) in self.volumes.into_iter().enumerate() {
            derived.push((v.full_name.clone(), v.mapped_blocks, v.extent_count));
            volumes.push(v.into_volume(i)?);
        }
        let d = MetadataDump { pool, volumes };
        d.validate()?;
        // Informational names and counts must agree with the rest.
        for (vd, (full_name, mapped, count)) in d.volumes.iter().zip(derived) {
            let ctx = format!("volume {}", vd.id);
            if full_name != d.full_name(vd) {
                return Err(format!("{ctx}: full_name does not match name and parent"));
            }
            if mapped != mapped_blocks(&vd.extents) || count != vd.extents.len() as u64 {
                return Err(format!(
                    "{ctx}: mapped_blocks/extent_count do not match its extents"
                ));
            }
        }
        Ok(d)
    }
}

impl PoolText {
    fn new(p: &PoolDump) -> PoolText {
        let layout = p.layout();
        let widen = |a: [u8; 3]| a.map(u64::from);
        PoolText {
            uuid: format_uuid(&p.uuid),
            block_size: BLOCK_SIZE as u64,
            pool_blocks: p.pool_blocks,
            max_pool_blocks: p.max_pool_blocks,
            chunk_blocks: p.chunk_blocks,
            ag_blocks: p.ag_blocks,
            max_hosts: p.max_hosts,
            journal_blocks: p.journal_blocks,
            io_timeout_ms: p.io_timeout_ms,
            data_start: layout.data_start,
            data_end: layout.data_end(),
            next_volume_id: p.next_volume_id,
            created_unix: p.created_unix,
            policy: PolicyText {
                data_warn_pct: widen(p.policy.data_warn_pct),
                meta_warn_pct: widen(p.policy.meta_warn_pct),
                when_full: p.policy.when_full.into(),
                queue_timeout_ms: p.policy.queue_timeout_ms,
                max_overcommit_pct: p.policy.max_overcommit_pct,
            },
            on_disk: p.on_disk.clone(),
        }
    }

    fn into_pool(self) -> std::result::Result<PoolDump, String> {
        if self.block_size != BLOCK_SIZE as u64 {
            return Err("pool: block_size must be 4096".into());
        }
        let policy = self.policy.into_policy()?;
        let pool = PoolDump {
            uuid: parse_uuid(&self.uuid)?,
            pool_blocks: self.pool_blocks,
            max_pool_blocks: self.max_pool_blocks,
            chunk_blocks: self.chunk_blocks,
            ag_blocks: self.ag_blocks,
            max_hosts: self.max_hosts,
            journal_blocks: self.journal_blocks,
            io_timeout_ms: self.io_timeout_ms,
            next_volume_id: self.next_volume_id,
            created_unix: self.created_unix,
            policy,
            on_disk: self.on_disk,
        };
        let layout = pool.checked_layout()?;
        if self.data_start != layout.data_start || self.data_end != layout.data_end() {
            return Err("pool: data_start/data_end do not match the geometry".into());
        }
        Ok(pool)
    }
}

impl PolicyText {
    fn into_policy(self) -> std::result::Result<Policy, String> {
        let pct = |key: &str, a: [u64; 3]| -> std::result::Result<[u8; 3], String> {
            if a.iter().any(|&n| n > 100) {
                return Err(format!("policy: \"{key}\" entries must be 0..=100"));
            }
            Ok(a.map(|n| n as u8))
        };
        Ok(Policy {
            data_warn_pct: pct("data_warn_pct", self.data_warn_pct)?,
            meta_warn_pct: pct("meta_warn_pct", self.meta_warn_pct)?,
            when_full: match self.when_full {
                w @ (0 | 1) => w as u8,
                _ => return Err("policy: when_full must be 0 or 1".into()),
            },
            queue_timeout_ms: self.queue_timeout_ms,
            max_overcommit_pct: self.max_overcommit_pct,
        })
    }
}

impl VolumeText<'_> {
    /// The volume listed `i`-th.
    fn into_volume(self, i: usize) -> std::result::Result<VolumeDump, String> {
        let mut fl = 0u32;
        for f in &self.flags {
            let bit = FLAG_NAMES.iter().find(|(_, n)| n == f).map(|(b, _)| *b);
            fl |= bit.ok_or_else(|| format!("volume {i}: unknown flag {f:?}"))?;
        }
        Ok(VolumeDump {
            id: self.id,
            name: self.name.into_owned(),
            flags: fl,
            size_bytes: self.size_bytes,
            parent_id: self.parent_id,
            origin_id: self.origin_id,
            created_unix: self.created_unix,
            active_host: self.active_host,
            extents: self.extents.into_owned(),
            on_disk: self.on_disk,
        })
    }
}

/// Extents as `[vblock, pblock, len]`, a zero extent as
/// `[vblock, "zero", len]`.
mod extent_list {
    use super::*;

    pub fn serialize<S: Serializer>(
        extents: &[Extent],
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(extents.iter().map(|e| ExtentText(*e)))
    }

    pub fn deserialize<'de, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Cow<'a, [Extent]>, D::Error> {
        let list = Vec::<ExtentText>::deserialize(d)?;
        Ok(Cow::Owned(list.into_iter().map(|e| e.0).collect()))
    }
}

struct ExtentText(Extent);

impl Serialize for ExtentText {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let e = &self.0;
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&e.vblock)?;
        if e.is_zero() {
            t.serialize_element("zero")?;
        } else {
            t.serialize_element(&e.pblock)?;
        }
        t.serialize_element(&e.len)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for ExtentText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_seq(ExtentVisitor)
    }
}

struct ExtentVisitor;

impl<'de> Visitor<'de> for ExtentVisitor {
    type Value = ExtentText;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an extent [vblock, pblock or \"zero\", len]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<ExtentText, A::Error> {
        let short = |n| de::Error::invalid_length(n, &ExtentVisitor);
        let vblock: u64 = seq.next_element()?.ok_or_else(|| short(0))?;
        let pblock: PblockText = seq.next_element()?.ok_or_else(|| short(1))?;
        let len: u64 = seq.next_element()?.ok_or_else(|| short(2))?;
        let mut n = 3;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            n += 1;
        }
        if n > 3 {
            return Err(short(n));
        }
        let (pblock, flags) = match pblock {
            PblockText::Block(p) => (p, 0),
            PblockText::Zero => (0, EXTENT_ZERO),
        };
        if vblock >= MAX_BLOCKS || pblock >= MAX_BLOCKS || len == 0 || len > MAX_EXTENT_BLOCKS {
            return Err(de::Error::custom(format!(
                "extent [{vblock}, {}, {len}] is out of range",
                if flags == 0 {
                    pblock.to_string()
                } else {
                    "\"zero\"".into()
                }
            )));
        }
        Ok(ExtentText(Extent {
            vblock,
            pblock,
            // At most MAX_EXTENT_BLOCKS, checked above.
            len: len as u32,
            flags,
        }))
    }
}

/// An extent's middle entry: a block number or `"zero"`.
enum PblockText {
    Block(u64),
    Zero,
}

impl<'de> Deserialize<'de> for PblockText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(PblockVisitor)
    }
}

struct PblockVisitor;

impl Visitor<'_> for PblockVisitor {
    type Value = PblockText;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a block number or \"zero\"")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<PblockText, E> {
        Ok(PblockText::Block(n))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<PblockText, E> {
        match s {
            "zero" => Ok(PblockText::Zero),
            _ => Err(E::invalid_value(Unexpected::Str(s), &self)),
        }
    }
}

/// `[u64; N]` from an array of exactly N numbers (serde_json's own reading
/// calls extra ones "trailing characters").
pub(super) fn exactly<'de, D: Deserializer<'de>, const N: usize>(
    d: D,
) -> std::result::Result<[u64; N], D::Error> {
    let numbers = Vec::<u64>::deserialize(d)?;
    let n = numbers.len();
    let expected = format!("an array of {N} numbers");
    numbers
        .try_into()
        .map_err(|_| de::Error::invalid_length(n, &expected.as_str()))
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

/// Keys whose value is written on one line (`[80, 90, 95]`,
/// `{"generation": 9, "root": 1360}`), with everything inside it.
const ONE_LINE: [&str; 4] = ["data_warn_pct", "meta_warn_pct", "flags", "on_disk"];

/// serde_json output in the layout of docs/FORMAT.md section 9: one key or
/// element per line, indented two spaces a level, except for the values
/// of [`ONE_LINE`] keys and arrays inside arrays (the extents), which are
/// on one line with `", "` and `": "` between their parts.
#[derive(Default)]
struct DumpFormatter {
    /// The open arrays and objects, outermost first.
    open: Vec<Level>,
    /// The last object key written (or being written).
    key: String,
    in_key: bool,
}

struct Level {
    array: bool,
    one_line: bool,
    empty: bool,
}

impl DumpFormatter {
    fn begin<W: ?Sized + io::Write>(&mut self, w: &mut W, array: bool) -> io::Result<()> {
        let one_line = match self.open.last() {
            None => false,
            Some(parent) if parent.one_line => true,
            Some(parent) if parent.array => array,
            Some(_) => ONE_LINE.contains(&self.key.as_str()),
        };
        self.open.push(Level {
            array,
            one_line,
            empty: true,
        });
        w.write_all(if array { b"[" } else { b"{" })
    }

    fn end<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        let level = self.open.pop().expect("serde_json closes what it opened");
        if !level.one_line && !level.empty {
            self.newline(w)?;
        }
        w.write_all(if level.array { b"]" } else { b"}" })
    }

    /// Before an array element or object key.
    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        let level = self.open.last_mut().expect("inside an array or object");
        level.empty = false;
        if level.one_line {
            return w.write_all(if first { b"" } else { b", " });
        }
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }

    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.open.len() {
            w.write_all(b"  ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for DumpFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, true)
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w)
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, false)
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.key.clear();
        self.in_key = true;
        self.item(w, first)
    }

    fn end_object_key<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.in_key = false;
        Ok(())
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if self.in_key {
            self.key.push_str(fragment);
        }
        w.write_all(fragment.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(vblock: u64, pblock: u64, len: u32, flags: u8) -> Extent {
        Extent {
            vblock,
            pblock,
            len,
            flags,
        }
    }

    /// A pool with a volume (a data and a zero extent), its snapshot (no
    /// extents) and a clone of the snapshot; numbers at their limits where
    /// nothing checks them.
    fn sample() -> MetadataDump {
        let volume = |id, name: &str, flags, parent_id, origin_id, extents| VolumeDump {
            id,
            name: name.into(),
            flags,
            size_bytes: 1 << 20,
            parent_id,
            origin_id,
            created_unix: u64::MAX,
            active_host: 0,
            extents,
            on_disk: VolumeOnDisk {
                header_blocks: [1344, 5000],
                generation: u64::MAX,
                root: 1400,
                root_twin: 6000,
                depth: 0,
                journal_seq: 7,
                journal_host: 1,
            },
        };
        MetadataDump {
            pool: PoolDump {
                uuid: *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff",
                pool_blocks: 8192,
                max_pool_blocks: 17179869184,
                chunk_blocks: 16,
                ag_blocks: 262144,
                max_hosts: 16,
                journal_blocks: 64,
                io_timeout_ms: 0,
                next_volume_id: 4,
                created_unix: u64::MAX,
                policy: Policy::default(),
                on_disk: PoolOnDisk {
                    generation: 9,
                    catalog_root: 1350,
                    commit_unix: u64::MAX,
                    journal_blocks_replayed: 2,
                },
            },
            volumes: vec![
                volume(
                    1,
                    "vm-1",
                    0,
                    0,
                    0,
                    vec![extent(0, 1408, 2, 0), extent(100, 0, 3, EXTENT_ZERO)],
                ),
                volume(2, "s1", flags::SNAPSHOT | flags::READ_ONLY, 1, 0, vec![]),
                volume(3, "c", 0, 0, 2, vec![extent(5, 1408, 1, 0)]),
            ],
        }
    }

    /// The layout docs/FORMAT.md section 9 shows, to the byte.
    const SAMPLE_TEXT: &str = r#"{
  "format": "thinlun-metadata-dump",
  "version": 1,
  "pool": {
    "uuid": "00112233-4455-6677-8899-aabbccddeeff",
    "block_size": 4096,
    "pool_blocks": 8192,
    "max_pool_blocks": 17179869184,
    "chunk_blocks": 16,
    "ag_blocks": 262144,
    "max_hosts": 16,
    "journal_blocks": 64,
    "io_timeout_ms": 0,
    "data_start": 1344,
    "data_end": 8192,
    "next_volume_id": 4,
    "created_unix": 18446744073709551615,
    "policy": {
      "data_warn_pct": [80, 90, 95],
      "meta_warn_pct": [80, 90, 95],
      "when_full": 0,
      "queue_timeout_ms": 60000,
      "max_overcommit_pct": 0
    },
    "on_disk": {"generation": 9, "catalog_root": 1350, "commit_unix": 18446744073709551615, "journal_blocks_replayed": 2}
  },
  "volumes": [
    {
      "id": 1,
      "name": "vm-1",
      "full_name": "vm-1",
      "flags": [],
      "size_bytes": 1048576,
      "parent_id": 0,
      "origin_id": 0,
      "snapshot_of": null,
      "clone_of": null,
      "created_unix": 18446744073709551615,
      "active_host": 0,
      "mapped_blocks": 2,
      "extent_count": 2,
      "on_disk": {"header_blocks": [1344, 5000], "generation": 18446744073709551615, "root": 1400, "root_twin": 6000, "depth": 0, "journal_seq": 7, "journal_host": 1},
      "extents": [
        [0, 1408, 2],
        [100, "zero", 3]
      ]
    },
    {
      "id": 2,
      "name": "s1",
      "full_name": "vm-1@s1",
      "flags": ["snapshot", "read_only"],
      "size_bytes": 1048576,
      "parent_id": 1,
      "origin_id": 0,
      "snapshot_of": "vm-1",
      "clone_of": null,
      "created_unix": 18446744073709551615,
      "active_host": 0,
      "mapped_blocks": 0,
      "extent_count": 0,
      "on_disk": {"header_blocks": [1344, 5000], "generation": 18446744073709551615, "root": 1400, "root_twin": 6000, "depth": 0, "journal_seq": 7, "journal_host": 1},
      "extents": []
    },
    {
      "id": 3,
      "name": "c",
      "full_name": "c",
      "flags": [],
      "size_bytes": 1048576,
      "parent_id": 0,
      "origin_id": 2,
      "snapshot_of": null,
      "clone_of": "vm-1@s1",
      "created_unix": 18446744073709551615,
      "active_host": 0,
      "mapped_blocks": 1,
      "extent_count": 1,
      "on_disk": {"header_blocks": [1344, 5000], "generation": 18446744073709551615, "root": 1400, "root_twin": 6000, "depth": 0, "journal_seq": 7, "journal_host": 1},
      "extents": [
        [5, 1408, 1]
      ]
    }
  ]
}
"#;

    #[test]
    fn writes_the_documented_layout_and_reads_it_back() {
        let d = sample();
        assert_eq!(d.to_json(), SAMPLE_TEXT);
        assert_eq!(MetadataDump::from_json(SAMPLE_TEXT).unwrap(), d);
        // Layout, key order and escapes are the writer's business only.
        let compact: String = SAMPLE_TEXT.lines().map(str::trim).collect();
        let moved = compact.replacen("\"version\": 1,", "", 1).replacen(
            "\"volumes\": [",
            "\"version\": 1, \"\\u0076olumes\": [",
            1,
        );
        assert_eq!(MetadataDump::from_json(&moved).unwrap(), d);
        let mut empty = d.clone();
        empty.volumes.clear();
        assert!(empty.to_json().ends_with("\"volumes\": []\n}\n"));
        assert_eq!(MetadataDump::from_json(&empty.to_json()).unwrap(), empty);
    }

    #[test]
    fn reads_dumps_made_before_ditto_nodes() {
        let old = SAMPLE_TEXT.replace(" \"root_twin\": 6000,", "");
        let d = MetadataDump::from_json(&old).unwrap();
        assert!(d.volumes.iter().all(|v| v.on_disk.root_twin == 0));
    }

    #[test]
    fn bad_input_is_an_error_that_names_the_field() {
        let error = |from: &str, to: &str| {
            let edited = SAMPLE_TEXT.replacen(from, to, 1);
            assert_ne!(edited, SAMPLE_TEXT, "{from}");
            MetadataDump::from_json(&edited).unwrap_err().to_string()
        };
        for (from, to, needle) in [
            (
                "\"format\": \"thinlun-metadata-dump\"",
                "\"format\": \"x\"",
                "not a thinlun-metadata-dump document",
            ),
            ("\"version\": 1", "\"version\": 2", "dump version 2"),
            (
                "\"pool_blocks\": 8192,",
                "",
                "pool: missing field `pool_blocks` at line",
            ),
            (
                "\"chunk_blocks\": 16",
                "\"chunk_blocks\": 4294967296",
                "pool.chunk_blocks: invalid value",
            ),
            (
                "\"depth\": 0",
                "\"depth\": \"0\"",
                "volumes[0].on_disk.depth: invalid type",
            ),
            (
                "\"root\": 1400",
                "\"root\": -1",
                "volumes[0].on_disk.root: invalid value",
            ),
            (
                "\"root\": 1400",
                "\"root\": 1.5",
                "volumes[0].on_disk.root: invalid type",
            ),
            (
                "\"root\": 1400",
                "\"root\": 18446744073709551616",
                "volumes[0].on_disk.root: invalid type",
            ),
            (
                "[1344, 5000]",
                "[1344, 5000, 1]",
                "volumes[0].on_disk.header_blocks: invalid length 3",
            ),
            (
                "[80, 90, 95]",
                "[80, 90]",
                "pool.policy.data_warn_pct: invalid length 2",
            ),
            (
                "[80, 90, 95]",
                "[80, 90, 101]",
                "\"data_warn_pct\" entries must be 0..=100",
            ),
            (
                "[0, 1408, 2]",
                "[0, 1408]",
                "volumes[0].extents[0]: invalid length 2, expected an extent",
            ),
            (
                "[100, \"zero\", 3]",
                "[100, \"none\", 3]",
                "volumes[0].extents[1][1]: invalid value",
            ),
            (
                "[0, 1408, 2]",
                "[0, 1408, 0]",
                "volumes[0].extents[0]: extent [0, 1408, 0] is out of range",
            ),
            (
                "[\"snapshot\", ",
                "[\"snap\", ",
                "volume 1: unknown flag \"snap\"",
            ),
            (
                "\"id\": 1,",
                "\"id\": 1, \"id\": 1,",
                "volumes[0]: duplicate field `id`",
            ),
            (
                "\"mapped_blocks\": 2",
                "\"mapped_blocks\": 3",
                "volume 1: mapped_blocks/extent_count",
            ),
            (
                "\"full_name\": \"vm-1@s1\"",
                "\"full_name\": \"s1\"",
                "volume 2: full_name does not match",
            ),
            (
                "\"data_end\": 8192",
                "\"data_end\": 8193",
                "data_start/data_end do not match",
            ),
            ("\"vm-1\"", "\"vm\u{1}\"", "control character"),
            ("\n}\n", "\n}\n}", "trailing characters at line 86"),
        ] {
            let e = error(from, to);
            assert!(e.starts_with("metadata dump: "), "{e}");
            assert!(e.contains(needle), "{from} -> {to}: {e}");
        }
        // Every prefix short of the closing brace is an error, never a
        // panic; so is deep nesting.
        for cut in 0..SAMPLE_TEXT.len() - 1 {
            assert!(MetadataDump::from_json(&SAMPLE_TEXT[..cut]).is_err());
        }
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(MetadataDump::from_json(&deep).is_err());
        let hidden = SAMPLE_TEXT.replacen(
            "\"block_size\"",
            &format!("\"x\": {deep}, \"block_size\""),
            1,
        );
        assert_eq!(MetadataDump::from_json(&hidden).unwrap(), sample());
    }

    #[test]
    fn uuid_text_round_trips() {
        let u = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";
        assert_eq!(parse_uuid(&format_uuid(&u)).unwrap(), u);
        assert!(parse_uuid("0011223344556677-8899-aabb-ccdd-eeff0").is_err());
        assert!(parse_uuid("zz112233-4455-6677-8899-aabbccddeeff").is_err());
    }
}
