# Runs inside the guest on host 1 until host 1 is killed (server and QEMU
# with SIGKILL). Everything it reports as flushed must be on host 2.
#
# An ext4 file system with an 8 MiB file, synced, then records appended
# to a log, each followed by sync (a virtio FLUSH) and "FLUSHED n" on the
# console. Unsynced writes run beside them, so the kill catches some in
# flight.
set -u
d=/dev/vda
mkfs.ext4 -q -F $d >/tmp/mkfs.log 2>&1 || { echo "CHECK mkfs FAIL"; tail -3 /tmp/mkfs.log; }
mkdir -p /mnt && mount $d /mnt || echo "CHECK mount FAIL"
dd if=/dev/urandom of=/mnt/keep bs=1M count=8 2>/dev/null
sync
echo "KEEP $(md5sum < /mnt/keep | cut -d' ' -f1)"
( while true; do dd if=/dev/urandom of=/mnt/unsynced bs=64k count=32 2>/dev/null; done ) &
i=0
while true; do
  printf 'record %08d\n' $i >> /mnt/log
  sync
  echo "FLUSHED $i"
  i=$((i+1))
done
