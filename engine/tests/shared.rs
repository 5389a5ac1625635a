//! A pool shared by several hosts, each a `Pool` in this process on one
//! in-memory LUN (the multi-process harness is tests/multihost.rs).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlun::check::check;
use thinlun::dev::{BlockDevice, MemDevice};
use thinlun::{Error, HostOptions, OpenOptions, Pool, PoolConfig, SharedConfig};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;
// Short enough for quick tests, long enough that a busy CI machine does not
// starve a renewal past the fence time (6T).
const IO_TIMEOUT_MS: u32 = 100;

struct Lun {
    dev: Arc<MemDevice>,
    dirs: PathBuf,
}

impl Lun {
    fn new(tag: &str) -> Lun {
        let dev = Arc::new(MemDevice::new(64 * MIB));
        let cfg = PoolConfig {
            chunk_bytes: 64 << 10,
            max_hosts: 8,
            shared: Some(SharedConfig {
                io_timeout_ms: IO_TIMEOUT_MS,
                group_bytes: Some(4 * MIB),
            }),
            ..PoolConfig::default()
        };
        Pool::create(dev.clone(), "mem", &cfg)
            .unwrap()
            .close()
            .unwrap();
        let dirs =
            std::env::temp_dir().join(format!("thinlun-shared-{tag}-{}", std::process::id()));
        Lun { dev, dirs }
    }

    /// Host `id` as if on its own machine (its own lock-file directory).
    fn host(&self, id: u32) -> thinlun::Result<Pool> {
        self.host_as(id, &format!("hv-{id}"), &format!("m{id}"))
    }

    /// Host `id` named `name`, on the machine whose lock files are in `dir`.
    fn host_as(&self, id: u32, name: &str, dir: &str) -> thinlun::Result<Pool> {
        self.host_on(id, name, dir, self.dev.clone())
    }

    /// Like [`Lun::host_as`], reaching the LUN through `dev`.
    fn host_on(
        &self,
        id: u32,
        name: &str,
        dir: &str,
        dev: Arc<dyn BlockDevice>,
    ) -> thinlun::Result<Pool> {
        self.host_on_boot(id, name, dir, dev, None)
    }

    /// Like [`Lun::host_on`], on the boot `boot_id` (`None`: this
    /// machine's; another value: a host on another machine).
    fn host_on_boot(
        &self,
        id: u32,
        name: &str,
        dir: &str,
        dev: Arc<dyn BlockDevice>,
        boot_id: Option<u64>,
    ) -> thinlun::Result<Pool> {
        let opts = OpenOptions {
            read_only: false,
            host: Some(HostOptions {
                host_id: id,
                host_name: Some(name.into()),
                watchdog: false,
                run_dir: Some(self.dirs.join(dir)),
            }),
            boot_id,
            ..Default::default()
        };
        Pool::open(dev, "mem", &opts)
    }

    /// An inspecting process: read-only, no host id.
    fn reader(&self) -> Pool {
        let opts = OpenOptions {
            read_only: true,
            host: None,
            boot_id: None,
            ..Default::default()
        };
        Pool::open(self.dev.clone(), "mem", &opts).unwrap()
    }

    fn check_clean(&self) {
        let dev: Arc<dyn BlockDevice> = self.dev.clone();
        let report = check(dev.as_ref(), "mem").unwrap();
        assert!(report.is_clean(), "{:?}", report.errors);
    }
}

fn write(pool: &Pool, vol: &str, block: u64, tag: u8) {
    let v = pool.open_volume(vol).unwrap();
    v.write(block * 8, &vec![tag; BS]).unwrap();
    v.flush().unwrap();
}

fn read(pool: &Pool, vol: &str, block: u64) -> u8 {
    let v = pool.open_volume(vol).unwrap();
    let mut buf = vec![0u8; BS];
    v.read(block * 8, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == buf[0]));
    buf[0]
}

#[test]
fn writing_needs_a_host_id_and_ids_are_exclusive() {
    let lun = Lun::new("ids");
    let e = Pool::open(lun.dev.clone(), "mem", &OpenOptions::default()).err();
    assert!(matches!(e, Some(Error::InvalidArgument(m)) if m.contains("host-id")));
    let h1 = lun.host(1).unwrap();
    // Same id from the same machine: refused by the local lock at once.
    assert!(matches!(
        lun.host(1),
        Err(Error::Busy {
            kind: thinlun::BusyKind::HostIdInUseHere,
            ..
        })
    ));
    // Same id from another machine: the slot keeps changing, so refused.
    let e = lun.host_as(1, "hv-other", "other").err();
    assert!(
        matches!(e, Some(Error::Busy { kind: thinlun::BusyKind::HostIdInUse, message: m }) if m.contains("in use by host 'hv-1'"))
    );
    // Read-only inspection needs no id.
    let ro = lun.reader();
    drop(ro);
    h1.close().unwrap();
    lun.check_clean();
}

#[test]
fn one_writer_per_volume_and_handover() {
    let lun = Lun::new("handover");
    let h1 = lun.host(1).unwrap();
    let h2 = lun.host(2).unwrap();
    h1.create_volume("vm-1", 8 * MIB).unwrap();
    let v = h1.open_volume("vm-1").unwrap();
    v.write(0, &vec![7u8; BS]).unwrap();
    v.flush().unwrap();
    // Host 2 sees the new volume but cannot activate it.
    let e = h2.open_volume("vm-1").err();
    assert!(
        matches!(&e, Some(Error::Busy { message: m, .. }) if m.contains("active on host 1") && m.contains("hv-1")),
        "{e:?}"
    );
    assert!(matches!(
        h2.create_snapshot("vm-1@s"),
        Err(Error::Busy { .. })
    ));
    assert!(matches!(
        h2.remove_volume("vm-1", true),
        Err(Error::Busy { .. })
    ));
    // Both hosts allocate at the same time, each in its own groups.
    h2.create_volume("vm-2", 8 * MIB).unwrap();
    let w = h2.open_volume("vm-2").unwrap();
    for i in 0..64u64 {
        v.write(i * 8, &vec![1u8; BS]).unwrap();
        w.write(i * 8, &vec![2u8; BS]).unwrap();
    }
    v.flush().unwrap();
    w.flush().unwrap();
    // Live migration: release on host 1, activate on host 2.
    drop(v);
    assert_eq!(read(&h2, "vm-1", 5), 1);
    write(&h2, "vm-1", 5, 9);
    // Host 1 takes a snapshot of vm-2 now that nobody has it open.
    drop(w);
    h1.create_snapshot("vm-2@s1").unwrap();
    assert_eq!(read(&h1, "vm-2@s1", 3), 2);
    assert_eq!(read(&h1, "vm-1", 5), 9);
    let status = h1.lock_status(Duration::ZERO).unwrap();
    assert_eq!(status.this_host, Some(1));
    assert!(status
        .hosts
        .iter()
        .any(|h| h.host_id == 2 && h.state == "live"));
    assert!(status.groups.iter().any(|&(_, o)| o == 1));
    assert!(status.groups.iter().any(|&(_, o)| o == 2));
    h2.close().unwrap();
    h1.close().unwrap();
    lun.check_clean();
    let h3 = lun.host(3).unwrap();
    assert_eq!(read(&h3, "vm-1", 5), 9);
    assert_eq!(read(&h3, "vm-2", 63), 2);
    h3.close().unwrap();
}

/// Host 2 writes block `i` of its volume vm-2 with `i + 1` for `i` below
/// `blocks`, flushes, and dies with the volume active.
fn host_2_dies_with_vm_2(lun: &Lun, blocks: u64) {
    let h2 = lun.host(2).unwrap();
    h2.create_volume("vm-2", 8 * MIB).unwrap();
    let w = h2.open_volume("vm-2").unwrap();
    for i in 0..blocks {
        w.write(i * 8, &vec![i as u8 + 1; BS]).unwrap();
    }
    w.flush().unwrap();
    std::mem::forget(w);
    h2.simulate_crash();
}

/// Creates vm-2 on `host`, writes block 0 with 1s and flushes, then
/// writes block 1 with 2s and only persists it; the volume stays open (its
/// handle is leaked, as a dying process leaves it).
fn persist_after_a_flush(host: &Pool) {
    host.create_volume("vm-2", 8 * MIB).unwrap();
    let v = host.open_volume("vm-2").unwrap();
    v.write(0, &vec![1u8; BS]).unwrap();
    v.flush().unwrap();
    v.write(8, &vec![2u8; BS]).unwrap();
    v.persist().unwrap();
    std::mem::forget(v);
}

/// A host dies after `persist` (its mapping journaled without a flush).
/// Recovered by a host on another machine (another boot), that write is
/// dropped, as after a power loss, and the flushed one kept; recovered on
/// the same boot (a crashed process on this machine), both are kept.
#[test]
fn unflushed_persists_of_a_dead_host_are_kept_only_on_its_boot() {
    for (other_machine, want) in [(true, 0u8), (false, 2u8)] {
        let lun = Lun::new(&format!("boot-{other_machine}"));
        let h2 = lun.host(2).unwrap();
        persist_after_a_flush(&h2);
        h2.simulate_crash();
        let boot = other_machine.then_some(0x0dd_b007);
        let h3 = lun
            .host_on_boot(3, "hv-3", "m3", lun.dev.clone(), boot)
            .unwrap();
        std::thread::sleep(dead_time());
        assert_eq!(read(&h3, "vm-2", 0), 1, "other machine: {other_machine}");
        assert_eq!(read(&h3, "vm-2", 1), want, "other machine: {other_machine}");
        h3.close().unwrap();
        lun.check_clean();
    }
}

/// A host's process dies after a persist, and a host on another machine
/// recovers it, dropping that write (as after a power loss) and going on
/// writing the volume. When the first host starts again on its own boot,
/// the unflushed record it left behind is stale and must not be replayed:
/// it would put back a mapping the volume's next writer replaced.
#[test]
fn a_record_left_before_another_hosts_recovery_is_not_replayed() {
    let lun = Lun::new("stale-record");
    let h2 = lun.host(2).unwrap();
    persist_after_a_flush(&h2);
    let path = h2.unflushed_record_path().unwrap();
    let left = std::fs::read(&path).unwrap();
    h2.simulate_crash();
    // The other machine does not see this machine's record.
    std::fs::remove_file(&path).unwrap();
    let h3 = lun
        .host_on_boot(3, "hv-3", "m3", lun.dev.clone(), Some(0x0dd_b007))
        .unwrap();
    std::thread::sleep(dead_time());
    assert_eq!(read(&h3, "vm-2", 1), 0, "recovered on another boot");
    let w = h3.open_volume("vm-2").unwrap();
    w.write(8, &vec![7u8; BS]).unwrap();
    w.flush().unwrap();
    drop(w);
    h3.close().unwrap();
    std::fs::write(&path, left).unwrap();
    let h2 = lun.host(2).unwrap();
    assert_eq!(read(&h2, "vm-2", 1), 7, "a stale record was replayed");
    h2.close().unwrap();
    lun.check_clean();
    assert!(!path.exists(), "a clean close leaves no record");
}

#[test]
fn dead_host_is_recovered_with_its_acknowledged_writes() {
    let lun = Lun::new("dead");
    let h1 = lun.host(1).unwrap();
    host_2_dies_with_vm_2(&lun, 32);
    // Until host 2 is seen dead its volume stays its own: without waiting
    // (thinctl --no-wait) the holder is named at once.
    h1.set_wait_for_dead_holders(false);
    let t = Instant::now();
    let e = h1.open_volume("vm-2").err();
    assert!(
        matches!(&e, Some(Error::Busy { message: m, .. }) if m.contains("active on host 2")),
        "{e:?}"
    );
    assert!(
        t.elapsed() < dead_time(),
        "no-wait waited {:?}",
        t.elapsed()
    );
    // Waiting (the default), open_volume returns once host 2 has stayed
    // silent for the dead time, and recovers it.
    h1.set_wait_for_dead_holders(true);
    let t = Instant::now();
    let v = h1.open_volume("vm-2").unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(6 * IO_TIMEOUT_MS as u64),
        "took a silent host's volume after only {:?}",
        t.elapsed()
    );
    drop(v);
    for i in 0..32u64 {
        assert_eq!(read(&h1, "vm-2", i), i as u8 + 1);
    }
    write(&h1, "vm-2", 0, 0xee);
    h1.close().unwrap();
    lun.check_clean();
    // Host 2 restarts as a new incarnation and finds nothing to replay.
    let h2 = lun.host(2).unwrap();
    assert_eq!(read(&h2, "vm-2", 0), 0xee);
    h2.close().unwrap();
    lun.check_clean();
}

#[test]
fn a_lost_lease_stops_writes() {
    let lun = Lun::new("fence");
    let h1 = lun.host(1).unwrap();
    h1.create_volume("vm-1", 8 * MIB).unwrap();
    let v = h1.open_volume("vm-1").unwrap();
    v.write(0, &vec![1u8; BS]).unwrap();
    v.flush().unwrap();
    // Another process takes the slot over (as after this host was
    // declared dead): this host's next renewal notices and fences.
    let dev: Arc<dyn BlockDevice> = lun.dev.clone();
    let mut b = thinlun::dev::read_block(dev.as_ref(), 16).unwrap().to_vec();
    b[48] ^= 0xff; // the nonce
    let crc = {
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..12]);
        h.update(&[0u8; 4]);
        h.update(&b[16..]);
        h.finalize()
    };
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    thinlun::dev::write_blocks(dev.as_ref(), &[(16, b)]).unwrap();
    std::thread::sleep(Duration::from_millis(5 * IO_TIMEOUT_MS as u64));
    assert!(h1.lease_lost().is_some());
    assert!(v.write(8, &vec![2u8; BS]).is_err());
    std::mem::forget(v);
    std::mem::forget(h1);
}

/// Fails every write once `budget` more writes have been issued: a host
/// whose power is cut at a chosen point.
struct CutDevice {
    inner: Arc<MemDevice>,
    budget: std::sync::atomic::AtomicI64,
}

impl BlockDevice for CutDevice {
    fn size_bytes(&self) -> std::io::Result<u64> {
        self.inner.size_bytes()
    }
    fn submit(&self, ops: &mut [thinlun::dev::IoOp<'_>]) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if ops
            .iter()
            .any(|o| matches!(o, thinlun::dev::IoOp::Write { .. }))
            && self.budget.fetch_sub(1, Ordering::SeqCst) <= 0
        {
            return Err(std::io::Error::other("power cut"));
        }
        self.inner.submit(ops)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.budget.load(std::sync::atomic::Ordering::SeqCst) <= 0 {
            return Err(std::io::Error::other("power cut"));
        }
        self.inner.flush()
    }
}

fn dead_time() -> Duration {
    Duration::from_millis(12 * IO_TIMEOUT_MS as u64)
}

#[test]
fn a_host_that_dies_while_recovering_another_is_recovered_too() {
    for cut_after in [0, 1, 2, 3, 5, 8, 13] {
        let lun = Lun::new(&format!("rec{cut_after}"));
        let h1 = lun.host(1).unwrap();
        host_2_dies_with_vm_2(&lun, 20);
        let cut = Arc::new(CutDevice {
            inner: lun.dev.clone(),
            budget: std::sync::atomic::AtomicI64::new(i64::MAX),
        });
        let h3 = lun.host_on(3, "hv-3", "m3", cut.clone()).unwrap();
        h3.create_volume("vm-3", 8 * MIB).unwrap();
        write(&h3, "vm-3", 0, 3);
        std::thread::sleep(dead_time());
        cut.budget
            .store(cut_after, std::sync::atomic::Ordering::SeqCst);
        // Host 3 starts recovering host 2 and loses power part way.
        let _ = h3.open_volume("vm-2").map(std::mem::forget);
        h3.simulate_crash();
        std::thread::sleep(dead_time());
        for i in 0..20u64 {
            assert_eq!(
                read(&h1, "vm-2", i),
                i as u8 + 1,
                "cut after {cut_after} writes"
            );
        }
        assert_eq!(read(&h1, "vm-3", 0), 3, "cut after {cut_after} writes");
        h1.close().unwrap();
        lun.check_clean();
    }
}

#[test]
fn racing_hosts_get_one_slot_one_volume_and_serialised_changes() {
    let lun = Arc::new(Lun::new("race"));
    // Two machines configured with the same id: exactly one joins.
    let joined: Vec<bool> = std::thread::scope(|s| {
        let a = s.spawn(|| {
            lun.host_as(4, "hv-a", "a")
                .map(|p| p.close().unwrap())
                .is_ok()
        });
        let b = s.spawn(|| {
            lun.host_as(4, "hv-b", "b")
                .map(|p| p.close().unwrap())
                .is_ok()
        });
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    // One wins the race; the loser either saw the winner's write after its
    // own or found the slot live and in use. (Both joining one after the
    // other is also correct when the first closed in time.)
    assert!(joined.iter().any(|&j| j), "{joined:?}");
    let hosts: Vec<Pool> = (1..=3).map(|id| lun.host(id).unwrap()).collect();
    hosts[0].create_volume("contested", 8 * MIB).unwrap();
    // Three hosts open one volume at once: exactly one gets it.
    let got: Vec<Option<thinlun::Volume>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| s.spawn(move || h.open_volume("contested").ok()))
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(got.iter().filter(|v| v.is_some()).count(), 1);
    drop(got);
    // Concurrent pool-wide changes from every host are all kept (a lost
    // catalog update would drop some).
    std::thread::scope(|s| {
        for (i, h) in hosts.iter().enumerate() {
            s.spawn(move || {
                for k in 0..6 {
                    h.create_volume(&format!("h{i}-v{k}"), MIB).unwrap();
                }
            });
        }
    });
    for h in hosts {
        h.close().unwrap();
    }
    let reader = lun.reader();
    let names: Vec<String> = reader.volumes().into_iter().map(|v| v.name).collect();
    for i in 0..3 {
        for k in 0..6 {
            assert!(
                names.contains(&format!("h{i}-v{k}")),
                "missing h{i}-v{k}: {names:?}"
            );
        }
    }
    drop(reader);
    lun.check_clean();
}

#[test]
fn a_torn_lease_sector_of_a_dead_host_is_recovered_and_of_a_live_one_repaired() {
    let lun = Lun::new("torn");
    let h1 = lun.host(1).unwrap();
    host_2_dies_with_vm_2(&lun, 1);
    // Host 2 died mid-renewal: half its slot is garbage.
    let dev: Arc<dyn BlockDevice> = lun.dev.clone();
    let slot2 = 17u64;
    let mut b = thinlun::dev::read_block(dev.as_ref(), slot2)
        .unwrap()
        .to_vec();
    b[2048..].fill(0xa5);
    thinlun::dev::write_blocks(dev.as_ref(), &[(slot2, b)]).unwrap();
    // Host 1's own slot torn too: its next renewal rewrites it.
    let slot1 = 16u64;
    let mut b = thinlun::dev::read_block(dev.as_ref(), slot1)
        .unwrap()
        .to_vec();
    b[100..200].fill(0);
    thinlun::dev::write_blocks(dev.as_ref(), &[(slot1, b)]).unwrap();
    std::thread::sleep(dead_time());
    assert!(h1.lease_lost().is_none());
    assert_eq!(read(&h1, "vm-2", 0), 1);
    h1.close().unwrap();
    lun.check_clean();
}

#[test]
fn hosts_claim_groups_as_they_fill_and_return_unused_ones() {
    let lun = Lun::new("groups");
    let h1 = lun.host(1).unwrap();
    let h2 = lun.host(2).unwrap();
    h1.create_volume("big", 24 * MIB).unwrap();
    let v = h1.open_volume("big").unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    for i in 0..(20 * MIB as usize / chunk.len()) as u64 {
        v.write(i * (chunk.len() as u64 / 512), &chunk).unwrap();
    }
    v.flush().unwrap();
    let owned = |p: &Pool, h: u32| {
        p.lock_status(Duration::ZERO)
            .unwrap()
            .groups
            .iter()
            .filter(|&&(_, o)| o == h)
            .count()
    };
    // 20 MiB written in 4 MiB groups: host 1 claimed at least five.
    assert!(owned(&h1, 1) >= 5, "{}", owned(&h1, 1));
    // Host 2 allocates elsewhere meanwhile.
    h2.create_volume("vm-x", 8 * MIB).unwrap();
    write(&h2, "vm-x", 0, 1);
    let mut reqs = [thinlun::Request::Discard {
        sector: 0,
        sectors: 24 * MIB / 512,
    }];
    for r in v.submit(&mut reqs) {
        r.unwrap();
    }
    v.flush().unwrap();
    drop(v);
    // The background thread hands back what it no longer needs.
    let before = owned(&h1, 1);
    std::thread::sleep(Duration::from_millis(3500));
    let after = owned(&h1, 1);
    assert!(after < before, "host 1 kept {after} of {before} groups");
    h2.close().unwrap();
    h1.close().unwrap();
    lun.check_clean();
}

/// A host that joins when every allocation group is claimed has no block
/// for metadata; holding nothing, it leaves without writing and its
/// close succeeds (it used to fail with "out of data space").
#[test]
fn a_host_without_a_group_closes_cleanly() {
    let lun = Lun::new("nogroup");
    let h1 = lun.host(1).unwrap();
    h1.create_volume("big", 64 * MIB).unwrap();
    let v = h1.open_volume("big").unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut full = false;
    for i in 0..64u64 {
        if v.write(i * (chunk.len() as u64 / 512), &chunk).is_err() {
            full = true;
            break;
        }
    }
    assert!(full, "the pool never filled");
    let h2 = lun.host(2).unwrap();
    let owned2 = h2
        .lock_status(Duration::ZERO)
        .unwrap()
        .groups
        .iter()
        .filter(|&&(_, o)| o == 2)
        .count();
    assert_eq!(owned2, 0, "host 2 found a group to claim");
    h2.close().unwrap();
    drop(v);
    h1.close().unwrap();
}

/// Damage that this host first meets when it reloads the pool (another
/// host wrote the tree, and its sectors went bad afterwards) gates this
/// host's I/O as damage found at open does: a read of the lost range fails
/// instead of reading as the hole the map has there, and other volumes
/// serve as usual.
#[test]
fn damage_first_seen_at_a_reload_fails_reads_of_the_lost_range() {
    let lun = Lun::new("reload-damage");
    let h1 = lun.host(1).unwrap();
    let h2 = lun.host(2).unwrap();
    h1.create_volume("vm-1", 8 * MIB).unwrap();
    h1.create_volume("vm-2", 8 * MIB).unwrap();
    // Each write releases its volume, so both trees are on the LUN.
    write(&h1, "vm-1", 5, 7);
    write(&h1, "vm-2", 5, 8);
    let d = thinlun::dump::dump(lun.dev.as_ref(), "mem").unwrap();
    let vm1 = d.volumes.iter().find(|v| v.name == "vm-1").unwrap();
    let (root, twin) = (vm1.on_disk.root, vm1.on_disk.root_twin);
    assert!(root != 0 && twin != 0, "a one-leaf tree with ditto copies");
    let zeros = |b: u64| (b, vec![0u8; BS]);
    thinlun::dev::write_blocks(lun.dev.as_ref(), &[zeros(root), zeros(twin)]).unwrap();
    // Host 2 loaded the pool before vm-1 was written: its next pool change
    // reloads, and meets the damage there.
    h2.create_volume("vm-3", MIB).unwrap();
    let v = h2.open_volume("vm-1").unwrap();
    let mut buf = vec![0u8; BS];
    let e = v.read(5 * 8, &mut buf);
    assert!(matches!(e, Err(Error::Damaged { .. })), "{e:?}");
    assert!(matches!(v.write(0, &buf), Err(Error::Damaged { .. })));
    drop(v);
    assert_eq!(read(&h2, "vm-2", 5), 8);
    write(&h2, "vm-3", 0, 3);
    h2.close().unwrap();
    h1.close().unwrap();
}
