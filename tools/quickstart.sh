#!/usr/bin/env bash
# A first session with thinlun: a pool in a sparse file, a thin volume, a
# raw disk image written into it and read back, and a consistency check.
# Usage: bash tools/quickstart.sh [DIR]   (default /var/tmp/thinlun-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/var/tmp/thinlun-demo}
mkdir -p "$dir"

cargo build --release -q -p thinctl
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
thinctl pool status
thinctl check
thinctl remove vm-101-disk-0
thinctl pool status --json
echo "pool file: $THINLUN_POOL ($(du -h "$THINLUN_POOL" | cut -f1) on disk for $(du -h --apparent-size "$THINLUN_POOL" | cut -f1))"
