#!/usr/bin/env bash
# A first session with thinlun: a pool in a sparse file, a thin volume, a
# raw disk image written into it and read back, a snapshot, a base image
# and a linked clone, usage, and the clone served over vhost-user-blk (to a
# benchmark client, and to a real QEMU guest when the lab is beside us);
# then a pool shared by two hosts (leases on the LUN, one writer per volume,
# release for live migration).
# Usage: bash tools/quickstart.sh [DIR]   (default /var/tmp/thinlun-demo)
# Everything it makes in DIR is removed at the end, whether it succeeds or
# not; KEEP=1 keeps it to look at.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/var/tmp/thinlun-demo}
made_dir=0
[ -d "$dir" ] || made_dir=1
mkdir -p "$dir"
cleanup() {
  [ "${KEEP:-0}" = 1 ] && { echo "kept: $dir" >&2; return; }
  rm -rf "$dir"/{pool.img,disk.raw,disk.out,shared.img,host1,host2,serve.log,serve-shared.log,vm-102.sock,vm-200.sock}
  if [ "$made_dir" = 1 ]; then rmdir "$dir" 2>/dev/null || true; fi
}
trap cleanup EXIT

# Two builds: a target filter such as --example applies to every package
# named, so one command would skip the thinctl binary.
cargo build --release -q -p thinctl
cargo build --release -q -p thinlun-vhost --example vhost_bench
thinctl() {
  echo "+ thinctl $*" >&2
  target/release/thinctl "$@"
}
export THINLUN_POOL="$dir/pool.img"
rm -f "$THINLUN_POOL" "$dir/disk.raw" "$dir/disk.out"

# A 64 MiB "disk image": 16 MiB of data, a 32 MiB hole, 16 MiB of data.
head -c 16M /dev/urandom >"$dir/disk.raw"
truncate -s 48M "$dir/disk.raw"
head -c 16M /dev/urandom >>"$dir/disk.raw"

thinctl pool create --size 8G
thinctl create vm-100-disk-0 4G
thinctl import vm-100-disk-0 "$dir/disk.raw"
thinctl list
thinctl info vm-100-disk-0
thinctl resize vm-100-disk-0 8G
thinctl rename vm-100-disk-0 vm-101-disk-0
thinctl export vm-101-disk-0 "$dir/disk.out"
cmp -n $((64 << 20)) "$dir/disk.raw" "$dir/disk.out"
echo "exported image matches the original (first 64 MiB; the rest reads as zeros)"
thinctl snapshot vm-101-disk-0@installed
thinctl base vm-101-disk-0 --name base-101-disk-0
thinctl clone base-101-disk-0 vm-102-disk-0
thinctl list
thinctl du

# Serve the linked clone to QEMU over vhost-user-blk; here a client without
# a VM writes to it for two seconds.
sock="$dir/vm-102.sock"
target/release/thinctl serve vm-102-disk-0 --socket "$sock" --queues 2 2>"$dir/serve.log" &
server=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
target/release/examples/vhost_bench "$sock" randwrite 2 32 2 64
lab=../shared/lab
if [ -x "$lab/run-guest.sh" ] && command -v qemu-system-x86_64 >/dev/null; then
  echo "+ booting a QEMU guest on $sock (mkfs, fsck, fio verify)" >&2
  "$lab/run-guest.sh" "$sock" "$lab/example-guest.sh" | grep -E 'CHECK|GUEST-END'
fi
kill -TERM "$server"; wait "$server" || true
tail -n 1 "$dir/serve.log"
thinctl diff base-101-disk-0@installed base-101-disk-0
thinctl pool status
thinctl check
thinctl remove vm-102-disk-0
thinctl remove base-101-disk-0 --recursive
echo "pool file: $THINLUN_POOL ($(du -h "$THINLUN_POOL" | cut -f1) on disk for $(du -h --apparent-size "$THINLUN_POOL" | cut -f1))"

# A pool two hosts share: each host has an id, and a volume served by one
# cannot be changed by the other until it is released (live migration).
# Two lock directories stand in for two machines; a short I/O timeout keeps
# the demo quick (the default is 10 s, as sanlock's).
shared="$dir/shared.img"
rm -f "$shared"
thinctl -p "$shared" pool create --size 1G --shared --io-timeout 200ms --group-size 64M
THINLUN_RUN_DIR="$dir/host1" thinctl -p "$shared" --host-id 1 create vm-200-disk-0 1G
sock2="$dir/vm-200.sock"
THINLUN_RUN_DIR="$dir/host1" target/release/thinctl -p "$shared" --host-id 1 \
  serve vm-200-disk-0 --socket "$sock2" 2>"$dir/serve-shared.log" &
server=$!
for _ in $(seq 100); do [ -S "$sock2" ] && break; sleep 0.1; done
thinctl -p "$shared" lock status
if THINLUN_RUN_DIR="$dir/host2" thinctl -p "$shared" --host-id 2 snapshot vm-200-disk-0@before; then
  echo "host 2 changed a volume host 1 serves: this must not happen" >&2
  exit 1
fi
THINLUN_RUN_DIR="$dir/host1" thinctl -p "$shared" --host-id 1 release vm-200-disk-0
THINLUN_RUN_DIR="$dir/host2" thinctl -p "$shared" --host-id 2 snapshot vm-200-disk-0@moved
kill -TERM "$server"; wait "$server" || true
thinctl -p "$shared" list
thinctl -p "$shared" check
rm -f "$shared"
