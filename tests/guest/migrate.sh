# Runs inside the guest across a live migration: reads the device with
# O_DIRECT (the server writes straight into guest pages, which the dirty
# log must carry to the target), and writes and reads back, in a loop.
set -u
d=/dev/vda
dd if=/dev/urandom of=/tmp/src bs=1M count=32 2>/dev/null
dd if=/tmp/src of=$d bs=1M oflag=direct 2>/dev/null; sync
a=$(md5sum </tmp/src | cut -d' ' -f1)
echo "MIGRATE-READY"
rounds=0; bad=0; wbad=0
end=$(( $(date +%s) + ${LOOP_SECS:-25} ))
while [ "$(date +%s)" -lt "$end" ]; do
  b=$(dd if=$d bs=1M count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$a" = "$b" ] || bad=$((bad+1))
  printf 'round %08d\n' $rounds | dd of=$d bs=4096 seek=$((9000 + rounds % 64)) conv=sync oflag=direct 2>/dev/null
  r=$(dd if=$d bs=4096 skip=$((9000 + rounds % 64)) count=1 iflag=direct 2>/dev/null | head -c 15)
  [ "$r" = "$(printf 'round %08d' $rounds)" ] || wbad=$((wbad+1))
  rounds=$((rounds+1))
done
echo "INFO rounds=$rounds bad_reads=$bad bad_writes=$wbad"
[ $bad -eq 0 ] && echo "CHECK migrate-reads ok" || echo "CHECK migrate-reads FAIL"
[ $wbad -eq 0 ] && echo "CHECK migrate-writes ok" || echo "CHECK migrate-writes FAIL"
fio --name=v --filename=$d --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16 --size=32M \
  --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.log 2>&1 && echo "CHECK fio-verify ok" || { echo "CHECK fio-verify FAIL"; tail -5 /tmp/fio.log; }
