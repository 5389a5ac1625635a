# Runs inside the guest across a live migration; the host starts it at
# MIGRATE-READY.
#
# fio reads the device with O_DIRECT in a loop and verifies each block
# (checksum and offset in its header): the server writes the data straight
# into the guest's buffers, and only its dirty log tells QEMU to send those
# pages again. A read completed by the source just before it stops, but
# missing from the log, arrives on the target holding another block's data.
# Writes and their read-back run alongside.
set -u
d=/dev/vda
v="--name=v --filename=$d --direct=1 --ioengine=io_uring --rw=write --bs=64k --iodepth=4 --size=32M --verify=crc32c --verify_fatal=1"
fio $v --do_verify=0 >/tmp/fill.log 2>&1 || { echo "CHECK fill FAIL"; tail -5 /tmp/fill.log; }
echo "MIGRATE-READY"
rounds=0; bad=0; wbad=0
end=$(( $(date +%s) + ${LOOP_SECS:-25} ))
while [ "$(date +%s)" -lt "$end" ]; do
  fio $v --verify_only=1 >/tmp/verify.log 2>&1 || { bad=$((bad+1)); tail -3 /tmp/verify.log; }
  blk=$((9000 + rounds % 64))
  printf 'round %08d\n' $rounds | dd of=$d bs=4096 seek=$blk conv=sync oflag=direct 2>/dev/null
  r=$(dd if=$d bs=4096 skip=$blk count=1 iflag=direct 2>/dev/null | head -c 14)
  [ "$r" = "$(printf 'round %08d' $rounds)" ] || wbad=$((wbad+1))
  rounds=$((rounds+1))
done
echo "INFO rounds=$rounds bad_reads=$bad bad_writes=$wbad"
[ $bad -eq 0 ] && echo "CHECK migrate-reads ok" || echo "CHECK migrate-reads FAIL"
[ $wbad -eq 0 ] && echo "CHECK migrate-writes ok" || echo "CHECK migrate-writes FAIL"
fio --name=w --filename=$d --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=16 --size=32M \
  --offset=64M --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.log 2>&1 && echo "CHECK fio-verify ok" || { echo "CHECK fio-verify FAIL"; tail -5 /tmp/fio.log; }
