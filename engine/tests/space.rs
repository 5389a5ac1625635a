//! A full pool: what fails, what keeps working, and how it recovers.

use std::sync::Arc;
use std::time::Duration;
use thinlun::check::check;
use thinlun::dev::MemDevice;
use thinlun::{Error, OpenOptions, Policy, Pool, PoolConfig};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;

fn small_pool(size: u64) -> (Arc<MemDevice>, Pool) {
    let dev = Arc::new(MemDevice::new(size));
    let cfg = PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts: 1,
        journal_bytes: Some(64 * 4096),
        ..PoolConfig::default()
    };
    let pool = Pool::create(dev.clone(), "mem", &cfg).unwrap();
    (dev, pool)
}

/// Writes 4 KiB blocks of `vol` from `start` until the pool is full;
/// returns how many were written.
fn fill(pool: &Pool, vol: &str, start: u64, tag: u8) -> u64 {
    let v = pool.open_volume(vol).unwrap();
    let mut b = start;
    loop {
        match v.write(b * 8, &vec![tag; BS]) {
            Ok(()) => b += 1,
            Err(Error::NoSpace) => return b - start,
            Err(e) => panic!("unexpected error while filling: {e}"),
        }
    }
}

fn assert_clean(dev: &MemDevice) {
    let report = check(dev, "mem").unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}

#[test]
fn a_full_pool_fails_only_writes_that_need_space() {
    let (dev, pool) = small_pool(24 * MIB);
    for name in ["a", "b"] {
        pool.create_volume(name, 64 * MIB).unwrap();
    }
    let a = pool.open_volume("a").unwrap();
    a.write(0, &vec![1u8; 2 * MIB as usize]).unwrap();
    pool.create_snapshot("a@s").unwrap();
    let written = fill(&pool, "b", 0, 2);
    assert!(written > 1000, "{written}");
    let st = pool.status();
    assert!(st.data_used_pct >= 95, "{}%", st.data_used_pct);
    // Reads, overwrites of blocks b owns alone, flush: all fine.
    let b = pool.open_volume("b").unwrap();
    let mut buf = vec![0u8; BS];
    b.read(8, &mut buf).unwrap();
    assert_eq!(buf[0], 2);
    b.write(8, &vec![3u8; BS]).unwrap();
    b.flush().unwrap();
    // A first write and a copy-on-write into data shared with a snapshot
    // both need a new block.
    assert!(matches!(
        b.write((written + 10) * 8, &vec![4u8; BS]),
        Err(Error::NoSpace)
    ));
    assert!(matches!(a.write(0, &vec![4u8; BS]), Err(Error::NoSpace)));
    a.read(0, &mut buf).unwrap();
    assert_eq!(buf[0], 1, "a failed write changes nothing");
    assert!(pool.verify_space().is_empty(), "{:?}", pool.verify_space());
    // Metadata still has its reserve: checkpoints and a clean close work.
    pool.checkpoint().unwrap();
    assert_clean(&dev);

    // Removing the snapshot frees what only it held... which is nothing
    // here (a still maps it all), so discard instead.
    pool.remove_volume("a@s", false).unwrap();
    b.discard(0, 256 * 8).unwrap();
    a.write(0, &vec![5u8; BS]).unwrap();
    b.write((written + 10) * 8, &vec![6u8; BS]).unwrap();
    // Write-zeroes frees space too.
    let before = pool.status().data_free_bytes;
    b.write_zeroes(256 * 8, 64 * 8).unwrap();
    b.flush().unwrap();
    assert!(pool.status().data_free_bytes >= before + 64 * BS as u64);
    drop(a);
    drop(b);
    pool.close().unwrap();
    assert_clean(&dev);
}

#[test]
fn removing_a_snapshot_lets_writes_resume() {
    let (_dev, pool) = small_pool(24 * MIB);
    pool.create_volume("v", 64 * MIB).unwrap();
    let v = pool.open_volume("v").unwrap();
    v.write(0, &vec![1u8; 4 * MIB as usize]).unwrap();
    pool.create_snapshot("v@old").unwrap();
    // Overwriting everything now needs new blocks: the snapshot keeps the old.
    v.write(0, &vec![2u8; 4 * MIB as usize]).unwrap();
    let n = fill(&pool, "v", 2048, 3);
    assert!(matches!(
        v.write((2048 + n) * 8, &vec![9u8; BS]),
        Err(Error::NoSpace)
    ));
    pool.remove_volume("v@old", false).unwrap();
    v.write((2048 + n) * 8, &vec![9u8; BS]).unwrap();
}

#[test]
fn power_loss_while_full_loses_nothing_acknowledged() {
    let (dev, pool) = small_pool(16 * MIB);
    pool.create_volume("v", 64 * MIB).unwrap();
    let n = fill(&pool, "v", 0, 1);
    let v = pool.open_volume("v").unwrap();
    v.flush().unwrap();
    dev.start_trace();
    // While full: overwrites, failed first writes, discards, flushes.
    for i in 0..20u64 {
        v.write(i * 8, &vec![10 + i as u8; BS]).unwrap();
        assert!(v.write((n + i) * 8, &vec![1u8; BS]).is_err());
        if i % 5 == 4 {
            v.flush().unwrap();
        }
    }
    v.discard(100 * 8, 8 * 8).unwrap();
    v.flush().unwrap();
    let acknowledged = dev.trace_len();
    let trace = dev.take_trace();
    for k in 0..=trace.events.len() {
        for kept in [false, true] {
            let img = trace.crash_image(k, &mut |_, _| kept);
            let d = Arc::new(MemDevice::from_image(img));
            assert_clean(&d);
            let p = Pool::open(
                d,
                "mem",
                &OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let r = p.open_volume("v").unwrap();
            let mut buf = vec![0u8; BS];
            for i in 0..20u64 {
                r.read(i * 8, &mut buf).unwrap();
                assert!(
                    buf[0] == 1 || buf[0] == 10 + i as u8,
                    "point {k} block {i}: {}",
                    buf[0]
                );
                if k == acknowledged {
                    assert_eq!(buf[0], 10 + i as u8);
                }
            }
        }
    }
}

#[test]
fn metadata_never_runs_out_before_data() {
    // Tiny scattered writes and many snapshots grow metadata as fast as
    // possible; the pool must fill its data, never its metadata.
    let (dev, pool) = small_pool(12 * MIB);
    pool.create_volume("v", 2 << 30).unwrap();
    let v = pool.open_volume("v").unwrap();
    let mut i = 0u64;
    let mut snaps = 0;
    loop {
        // Every block in its own extent, far apart, 4 KiB each.
        match v.write((i * 977 % 200_000) * 2 * 8, &vec![7u8; BS]) {
            Ok(()) => {}
            Err(Error::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        i += 1;
        if i.is_multiple_of(300) {
            pool.create_snapshot(&format!("v@s{snaps}")).unwrap();
            snaps += 1;
        }
    }
    assert!(snaps > 3, "{snaps} snapshots");
    let st = pool.status();
    assert!(
        st.data_free_bytes < 2 * MIB,
        "filled: {} free",
        st.data_free_bytes
    );
    // Everything that commits metadata still works when data is full.
    v.flush().unwrap();
    pool.checkpoint().unwrap();
    pool.remove_volume("v@s0", false).unwrap();
    drop(v);
    pool.close().unwrap();
    assert_clean(&dev);
    let p = Pool::open(dev.clone(), "mem", &OpenOptions::default()).unwrap();
    assert_eq!(p.volume_info("v").unwrap().mapped_bytes, i * BS as u64);
}

#[test]
fn queue_policy_waits_for_space() {
    let (_dev, pool) = small_pool(16 * MIB);
    pool.create_volume("v", 64 * MIB).unwrap();
    pool.set_policy(Policy {
        when_full: 1,
        queue_timeout_ms: 5000,
        ..Policy::default()
    })
    .unwrap();
    let end = fill_from(&pool, 64);
    let writer = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            pool.open_volume("v")
                .unwrap()
                .write((end + 5) * 8, &vec![8u8; BS])
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!writer.is_finished(), "the write waits for space");
    pool.open_volume("v")
        .unwrap()
        .discard(64 * 8, 64 * 8)
        .unwrap();
    writer.join().unwrap().unwrap();
    // With a short timeout the write fails once it has waited.
    pool.set_policy(Policy {
        when_full: 1,
        queue_timeout_ms: 200,
        ..Policy::default()
    })
    .unwrap();
    let end = fill_from(&pool, end + 6);
    let t = std::time::Instant::now();
    let r = pool
        .open_volume("v")
        .unwrap()
        .write((end + 100) * 8, &vec![8u8; BS]);
    assert!(matches!(r, Err(Error::NoSpace)));
    assert!(t.elapsed() >= Duration::from_millis(200));
}

/// Fills "v" from `start` with the error policy (so the fill itself does
/// not wait), restores the policy, and returns the first block not written.
fn fill_from(pool: &Pool, start: u64) -> u64 {
    let saved = pool.status().policy;
    pool.set_policy(Policy::default()).unwrap();
    let n = fill(pool, "v", start, 5);
    pool.set_policy(saved).unwrap();
    start + n
}

#[test]
fn thresholds_overcommit_and_bad_policies() {
    let (_dev, pool) = small_pool(24 * MIB);
    let data = pool.status().data_bytes;
    pool.set_policy(Policy {
        max_overcommit_pct: 150,
        ..Policy::default()
    })
    .unwrap();
    pool.create_volume("a", data / 4096 * 4096).unwrap();
    let e = pool.create_volume("b", data / 4096 * 4096).unwrap_err();
    assert!(e.to_string().contains("overcommit"), "{e}");
    pool.create_volume_with("b", data / 4096 * 4096, true)
        .unwrap();
    assert!(pool.threshold_events().is_empty());
    let v = pool.open_volume("a").unwrap();
    v.write(0, &vec![1u8; (data * 85 / 100) as usize / BS * BS])
        .unwrap();
    let ev = pool.threshold_events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        ev[0].crossed && ev[0].threshold_pct == 80 && ev[0].kind == "data",
        "{ev:?}"
    );
    assert!(ev[0].to_string().contains("80%"));
    assert!(
        pool.threshold_events().is_empty(),
        "reported once per crossing"
    );
    assert!(pool.thresholds_crossed().contains(&"data 80%".to_string()));
    v.discard(0, data / 512).unwrap();
    v.flush().unwrap();
    let ev = pool.threshold_events();
    assert!(ev.len() == 1 && !ev[0].crossed, "{ev:?}");
    for bad in [
        Policy {
            data_warn_pct: [95, 90, 80],
            ..Policy::default()
        },
        Policy {
            when_full: 7,
            ..Policy::default()
        },
        Policy {
            max_overcommit_pct: 10,
            ..Policy::default()
        },
    ] {
        assert!(matches!(
            pool.set_policy(bad),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert_eq!(
        pool.status().policy.max_overcommit_pct,
        150,
        "refused policies change nothing"
    );
}
