//! Where the blocks of a read or write go, decided under the metadata lock,
//! and what a finished write publishes. Shared by the two data paths: whole
//! batches ([`crate::Volume::submit`]) and queues ([`crate::IoQueue`]).

use crate::alloc::refs::SharedRefs;
use crate::alloc::space::SpaceMap;
use crate::format::journal::Entry;
use crate::map::extmap::{RefChanges, Segment};
use crate::map::state::{State, Vol};

/// `n` blocks at physical `pblock`, or zeros (a read of a hole).
#[derive(Clone, Copy)]
pub(crate) struct Piece {
    pub n: u64,
    pub pblock: Option<u64>,
}

/// A first write's new blocks: (virtual block, physical block, count).
pub(crate) type Alloc = (u64, u64, u64);

/// Reusable vectors, so planning allocates nothing per request.
#[derive(Default)]
pub(crate) struct Scratch {
    segs: Vec<Segment>,
    runs: Vec<(u64, u64, bool)>,
    targets: Vec<(u64, u64, Option<u64>)>,
}

/// The pieces of a read of blocks `b0..b0 + n`, appended to `plan`.
pub(crate) fn plan_read(vol: &Vol, b0: u64, n: u64, sc: &mut Scratch, plan: &mut Vec<Piece>) {
    vol.map.lookup(b0, n, &mut sc.segs);
    plan.extend(sc.segs.iter().map(|s| Piece {
        n: s.len(),
        pblock: match *s {
            Segment::Mapped { pblock, .. } => Some(pblock),
            _ => None,
        },
    }));
}

/// The targets of a write of blocks `b0..b0 + n`, appended to `plan`:
/// in place where this volume alone holds a block, new blocks for holes
/// and for blocks shared with snapshots or clones (copy-on-write at
/// 4 KiB), appended to `allocs`. Returns false, with nothing allocated
/// and nothing appended, when the pool has no room (`reserve` blocks stay
/// for metadata).
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_write(
    vol: &mut Vol,
    refs: &SharedRefs,
    space: &mut SpaceMap,
    reserve: u64,
    b0: u64,
    n: u64,
    sc: &mut Scratch,
    plan: &mut Vec<Piece>,
    allocs: &mut Vec<Alloc>,
) -> bool {
    vol.map.lookup(b0, n, &mut sc.segs);
    sc.targets.clear();
    for s in &sc.segs {
        match *s {
            Segment::Mapped {
                vblock,
                len,
                shared_leaf: true,
                ..
            } => sc.targets.push((vblock, len, None)),
            Segment::Mapped {
                vblock,
                pblock,
                len,
                shared_leaf: false,
            } => {
                sc.runs.clear();
                refs.runs(pblock, len, &mut sc.runs);
                for &(p, n, shared) in &sc.runs {
                    sc.targets
                        .push((vblock + (p - pblock), n, (!shared).then_some(p)));
                }
            }
            Segment::Hole { vblock, len } | Segment::Zero { vblock, len } => {
                sc.targets.push((vblock, len, None))
            }
        }
    }
    let (first_piece, first_alloc) = (plan.len(), allocs.len());
    for &(vblock, len, in_place) in &sc.targets {
        if let Some(p) = in_place {
            plan.push(Piece {
                n: len,
                pblock: Some(p),
            });
            continue;
        }
        let mut done = 0;
        while done < len {
            let got = if space.free_blocks() < len - done + reserve {
                None
            } else {
                space.allocate_run(&mut vol.cursor, len - done)
            };
            let Some((p, n)) = got else {
                for &(_, p, n) in &allocs[first_alloc..] {
                    space.release(p, n);
                }
                allocs.truncate(first_alloc);
                plan.truncate(first_piece);
                return false;
            };
            plan.push(Piece { n, pblock: Some(p) });
            allocs.push((vblock + done, p, n));
            done += n;
        }
    }
    true
}

/// Publishes the new blocks of finished first writes of volume `id`:
/// mapped and queued for the journal when their data is written (`ok`),
/// or given back at once when it is not or the volume is gone (never
/// mapped, never journalled).
pub(crate) fn publish(st: &mut State, id: u64, allocs: &[Alloc], ok: bool) {
    if allocs.is_empty() {
        return;
    }
    let mut ch = RefChanges::default();
    match (ok, st.volumes.get_mut(&id)) {
        (true, Some(vol)) => {
            let mut entries = Vec::with_capacity(allocs.len());
            for &(v, p, n) in allocs {
                vol.map.map(v, p, n, &mut ch);
                entries.push(Entry::Map {
                    volume: id,
                    vblock: v,
                    pblock: p,
                    len: n as u32,
                });
            }
            st.queue_entries(&entries);
        }
        _ => {
            for &(_, p, n) in allocs {
                st.space.release(p, n);
            }
        }
    }
    st.apply_changes(&ch);
}
