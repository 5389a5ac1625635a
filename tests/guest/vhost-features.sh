# Runs inside the lab guest (busybox sh) before example-guest.sh: what the
# virtio-blk device offers, as Linux sees it, and a discard round trip.
# @SERIAL@ and @NQ@ are filled in by tests/vhost_qemu.rs.
q=/sys/block/vda/queue
v() { cat "$1" 2>/dev/null; }
echo "INFO lbs=$(v $q/logical_block_size) pbs=$(v $q/physical_block_size) min_io=$(v $q/minimum_io_size) opt_io=$(v $q/optimal_io_size) discard_gran=$(v $q/discard_granularity) discard_max=$(v $q/discard_max_bytes) wz_max=$(v $q/write_zeroes_max_bytes) max_segments=$(v $q/max_segments) cache=$(v $q/write_cache) ro=$(v /sys/block/vda/ro) serial=$(v /sys/block/vda/serial) hw_queues=$(ls /sys/block/vda/mq | wc -l)"
check() { if [ "$2" = "$3" ]; then echo "CHECK $1 ok"; else echo "CHECK $1 FAIL ($2 != $3)"; fi; }
check discard-supported "$([ "$(v $q/discard_max_bytes)" -gt 0 ] && echo yes)" yes
check discard-granularity "$(v $q/discard_granularity)" 4096
check write-zeroes-supported "$([ "$(v $q/write_zeroes_max_bytes)" -gt 0 ] && echo yes)" yes
check physical-block "$(v $q/physical_block_size)" 4096
check write-cache "$(v $q/write_cache)" "write back"
check serial "$(v /sys/block/vda/serial)" "@SERIAL@"
check queues "$(ls /sys/block/vda/mq | wc -l)" "@NQ@"
check max-segments "$([ "$(v $q/max_segments)" -gt 1 ] && echo yes)" yes
# Discard round trip: 4 MiB of random data, discarded, reads back as zeros
# (the engine unmaps whole 4 KiB blocks).
fio --name=w --filename=/dev/vda --direct=1 --rw=write --bs=64k --size=4M --offset=64M \
  --buffer_pattern=0xdeadbeef >/dev/null 2>&1
fio --name=t --filename=/dev/vda --rw=trim --bs=1M --size=4M --offset=64M >/tmp/trim.log 2>&1
echo 3 > /proc/sys/vm/drop_caches
a=$(dd if=/dev/vda bs=1M skip=64 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
b=$(dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)
check discard-reads-zeros "$a" "$b"
