# Runs inside the guest booted on host 2 after host 1 died; the host puts
# KEEP_MD5 (the synced file's checksum) and FLUSHED (the last record host
# 1's guest reported synced) above this line.
set -u
d=/dev/vda
mkdir -p /mnt
# Mounting replays ext4's journal, as a restarted VM does.
mount $d /mnt && echo "CHECK mount ok" || echo "CHECK mount FAIL"
got=$(md5sum < /mnt/keep | cut -d' ' -f1)
[ "$got" = "$KEEP_MD5" ] && echo "CHECK synced-file ok" || echo "CHECK synced-file FAIL ($got)"
# Every record synced before the kill, in order (later ones may be there too).
want=$(i=0; while [ $i -le "$FLUSHED" ]; do printf 'record %08d\n' $i; i=$((i+1)); done | md5sum | cut -d' ' -f1)
have=$(head -n $((FLUSHED + 1)) /mnt/log | md5sum | cut -d' ' -f1)
echo "INFO records=$(wc -l < /mnt/log) synced_before_kill=$((FLUSHED + 1))"
[ "$want" = "$have" ] && echo "CHECK synced-records ok" || { echo "CHECK synced-records FAIL"; tail -3 /mnt/log; }
umount /mnt
e2fsck -fn $d >/tmp/fsck.log 2>&1 && echo "CHECK fsck ok" || { echo "CHECK fsck FAIL"; tail -5 /tmp/fsck.log; }
# The volume is this host's now: it takes writes.
mount $d /mnt && echo after > /mnt/after && sync && umount /mnt && echo "CHECK write-after ok" || echo "CHECK write-after FAIL"
