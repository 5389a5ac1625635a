//! A pool shared by several hosts, each a `Pool` in this process on one
//! in-memory LUN (the multi-process harness is tests/multihost.rs).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thinlun::check::check;
use thinlun::dev::{BlockDevice, MemDevice};
use thinlun::{Error, HostOptions, OpenOptions, Pool, PoolConfig, SharedConfig};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;
const IO_TIMEOUT_MS: u32 = 20;

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
        let opts = OpenOptions {
            read_only: false,
            host: Some(HostOptions {
                host_id: id,
                host_name: Some(format!("hv-{id}")),
                watchdog: false,
                run_dir: Some(self.dirs.join(format!("m{id}"))),
            }),
        };
        Pool::open(self.dev.clone(), "mem", &opts)
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
    let opts = OpenOptions {
        read_only: false,
        host: Some(HostOptions {
            host_id: 1,
            host_name: Some("hv-1".into()),
            watchdog: false,
            run_dir: Some(lun.dirs.join("m1")),
        }),
    };
    assert!(matches!(
        Pool::open(lun.dev.clone(), "mem", &opts),
        Err(Error::Busy(_))
    ));
    // Same id from another machine: the slot keeps changing, so refused.
    let e = lun.host_as(1, "hv-other", "other").err();
    assert!(matches!(e, Some(Error::Busy(m)) if m.contains("in use by host 'hv-1'")));
    // Read-only inspection needs no id.
    let ro = Pool::open(
        lun.dev.clone(),
        "mem",
        &OpenOptions {
            read_only: true,
            host: None,
        },
    )
    .unwrap();
    drop(ro);
    h1.close().unwrap();
    lun.check_clean();
}

impl Lun {
    fn host_as(&self, id: u32, name: &str, dir: &str) -> thinlun::Result<Pool> {
        let opts = OpenOptions {
            read_only: false,
            host: Some(HostOptions {
                host_id: id,
                host_name: Some(name.into()),
                watchdog: false,
                run_dir: Some(self.dirs.join(dir)),
            }),
        };
        Pool::open(self.dev.clone(), "mem", &opts)
    }
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
        matches!(&e, Some(Error::Busy(m)) if m.contains("active on host 1") && m.contains("hv-1")),
        "{e:?}"
    );
    assert!(matches!(h2.create_snapshot("vm-1@s"), Err(Error::Busy(_))));
    assert!(matches!(
        h2.remove_volume("vm-1", true),
        Err(Error::Busy(_))
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

#[test]
fn dead_host_is_recovered_with_its_acknowledged_writes() {
    let lun = Lun::new("dead");
    let h1 = lun.host(1).unwrap();
    let h2 = lun.host(2).unwrap();
    h2.create_volume("vm-2", 8 * MIB).unwrap();
    let w = h2.open_volume("vm-2").unwrap();
    for i in 0..32u64 {
        w.write(i * 8, &vec![i as u8 + 1; BS]).unwrap();
    }
    w.flush().unwrap();
    std::mem::forget(w);
    h2.simulate_crash();
    // Until host 2 is seen dead its volume stays its own.
    assert!(matches!(h1.open_volume("vm-2"), Err(Error::Busy(_))));
    std::thread::sleep(Duration::from_millis(12 * IO_TIMEOUT_MS as u64));
    // Any pool-wide change (here: opening the volume) recovers host 2.
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
