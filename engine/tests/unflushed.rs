//! The unflushed record (docs/FORMAT.md, 6.7): a persist writes nothing to
//! the LUN, a crash of the process keeps what it vouched for, a record that
//! runs out of room falls back to a commit, and a reopened writer journals
//! what it replayed.

use std::sync::Arc;
use thinlun::dev::{Event, MemCopy, MemDevice, TracedMemory};
use thinlun::{OpenOptions, Pool, PoolConfig, UnflushedPlace};

const BS: usize = 4096;

fn cfg() -> PoolConfig {
    PoolConfig {
        chunk_bytes: 64 << 10,
        max_hosts: 1,
        ..PoolConfig::default()
    }
}

/// A pool on a fresh in-memory LUN whose record lives in `bytes` of traced
/// surviving memory.
fn pool_with_record(bytes: usize) -> (Arc<MemDevice>, Arc<TracedMemory>, Pool) {
    let dev = Arc::new(MemDevice::new(32 << 20));
    let pool = Pool::create(dev.clone(), "mem", &cfg()).unwrap();
    pool.create_volume("vm", 4 << 20).unwrap();
    pool.close().unwrap();
    let memory = dev.surviving_memory(bytes);
    let opts = OpenOptions {
        unflushed: UnflushedPlace::In(memory.clone()),
        ..Default::default()
    };
    let pool = Pool::open(dev.clone(), "mem", &opts).unwrap();
    (dev, memory, pool)
}

/// What a process that died now leaves: the LUN's writes and the memory.
fn after_process_crash(dev: &MemDevice, memory: &TracedMemory) -> Pool {
    let opts = OpenOptions {
        read_only: true,
        unflushed: UnflushedPlace::In(Arc::new(MemCopy::new(memory.contents()))),
        ..Default::default()
    };
    Pool::open(Arc::new(MemDevice::from_image(dev.image())), "mem", &opts).unwrap()
}

fn block_of(pool: &Pool, block: u64) -> u8 {
    let mut buf = vec![0u8; BS];
    pool.open_volume("vm")
        .unwrap()
        .read(block * 8, &mut buf)
        .unwrap();
    buf[0]
}

#[test]
fn a_persist_writes_nothing_and_a_process_crash_keeps_its_writes() {
    // The background committer may commit between the write and the
    // crash; then the test proves nothing, so try again.
    for _ in 0..5 {
        let (dev, memory, pool) = pool_with_record(1 << 20);
        let vol = pool.open_volume("vm").unwrap();
        dev.start_trace();
        vol.write(3 * 8, &[7u8; BS]).unwrap(); // a first write: a new mapping
        let after_write = dev.trace_len();
        vol.persist().unwrap();
        let trace = dev.take_trace();
        if trace.events.iter().any(|e| matches!(e, Event::Flush)) {
            continue;
        }
        assert_eq!(trace.events.len(), after_write, "persist did I/O");
        let device_writes = trace
            .events
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count();
        assert_eq!(device_writes, 1, "the data only: {:?}", trace.events.len());
        assert!(trace
            .events
            .iter()
            .any(|e| matches!(e, Event::Store { .. })));
        let back = after_process_crash(&dev, &memory);
        assert_eq!(block_of(&back, 3), 7, "a persisted write was lost");
        // Without the record, the LUN alone does not have it: the record
        // is what kept it.
        let lun_only = Pool::open(
            Arc::new(MemDevice::from_image(dev.image())),
            "mem",
            &OpenOptions {
                read_only: true,
                unflushed: UnflushedPlace::Off,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(block_of(&lun_only, 3), 0);
        std::mem::forget(vol);
        std::mem::forget(pool);
        return;
    }
    panic!("five tries in a row were interrupted by a commit");
}

#[test]
fn a_full_record_makes_persist_commit() {
    // Two slots of three entries each.
    let bytes = 2 * (128 + 3 * 40);
    let (dev, memory, pool) = pool_with_record(bytes);
    let vol = pool.open_volume("vm").unwrap();
    dev.start_trace();
    for b in 0..8u64 {
        // Every other block: eight mappings that do not merge.
        vol.write(2 * b * 8, &[b as u8 + 1; BS]).unwrap();
    }
    vol.persist().unwrap();
    let trace = dev.take_trace();
    assert!(
        trace.events.iter().any(|e| matches!(e, Event::Flush)),
        "a persist beyond the record's room must commit"
    );
    let back = after_process_crash(&dev, &memory);
    for b in 0..8u64 {
        assert_eq!(block_of(&back, 2 * b), b as u8 + 1);
    }
    std::mem::forget(vol);
    std::mem::forget(pool);
}

#[test]
fn a_reopened_writer_journals_what_it_replayed() {
    let (dev, memory, pool) = pool_with_record(1 << 20);
    let vol = pool.open_volume("vm").unwrap();
    vol.write(5 * 8, &[9u8; BS]).unwrap();
    vol.persist().unwrap();
    // The process dies; a new one opens the pool for writing.
    let image = dev.image();
    let kept = Arc::new(MemCopy::new(memory.contents()));
    std::mem::forget(vol);
    std::mem::forget(pool);
    let dev = Arc::new(MemDevice::from_image(image));
    let opts = OpenOptions {
        unflushed: UnflushedPlace::In(kept),
        ..Default::default()
    };
    dev.start_trace();
    let pool = Pool::open(dev.clone(), "mem", &opts).unwrap();
    assert_eq!(block_of(&pool, 5), 9);
    // The replayed change is on the LUN now, flushed: a power loss right
    // after the open (which clears the record, and drops every write not
    // flushed) keeps it.
    let trace = dev.take_trace();
    std::mem::forget(pool);
    let after_power_loss = Pool::open(
        Arc::new(MemDevice::from_image(
            trace.crash_image(trace.events.len(), &mut |_, _| false),
        )),
        "mem",
        &OpenOptions {
            read_only: true,
            boot_id: Some(0x5eb0_07ed),
            unflushed: UnflushedPlace::Off,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(block_of(&after_power_loss, 5), 9);
}
