#!/usr/bin/env bash
# Instruction counts of the engine's 4 KiB write path under callgrind, in
# one command (see BENCHMARKS.md, "Profile of the write path"). Installs
# valgrind when missing (as root, with apt-get), builds profile_write, makes
# its pool in $THINLUN_BENCH_DIR (default /var/tmp/thinlun-bench), and runs
# each case in a fresh process under callgrind, next to the same process
# with no writes. Prints instructions per write: (case - baseline) / writes,
# which includes the background commits and the clean-up that the writes
# cause. The callgrind files stay in target/profile/ for callgrind_annotate.
# The order matters: the first `cow` run starts from the volume as written
# by setup (1 MiB writes), the second from the one the first has
# fragmented (every block it wrote became an extent of its own).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >&2
    else
        echo "valgrind is missing: apt-get install valgrind" >&2
        exit 1
    fi
fi
cargo build --release -q -p thinlun-benches --bin profile_write
P=target/release/profile_write
out=target/profile
mkdir -p "$out"
rm -f "$out"/cg.*
$P setup

# Instructions of one run: KIND QD COUNT [persist]; file $out/cg.NAME.
ir() {
    local name=$1
    shift
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.$name" "$P" "$@" 2>&1 |
        sed -n 's/.*Collected : //p'
}

printf '%-34s %14s %14s\n' case instructions 'per write'
row() {
    local label=$1 name=$2 base=$3 count=$4
    shift 4
    local total
    total=$(ir "$name" "$@")
    printf '%-34s %14s %14s\n' "$label" "$total" $(((total - base) / count))
}
b32=$(ir first-32-0 first 32 0)
b1=$(ir first-1-0 first 1 0)
row "first write, QD32" first-32 "$b32" 32768 first 32 32768
row "first write, QD1" first-1 "$b1" 8192 first 1 8192
row "first write, QD1, persist each" first-1-persist "$b1" 8192 first 1 8192 persist
o32=$(ir over-32-0 over 32 0)
o1=$(ir over-1-0 over 1 0)
row "overwrite, QD32" over-32 "$o32" 32768 over 32 32768
row "overwrite, QD1" over-1 "$o1" 8192 over 1 8192
c32=$(ir cow-32-0 cow 32 0)
c1=$(ir cow-1-0 cow 1 0)
row "write after snapshot, QD32" cow-32 "$c32" 32768 cow 32 32768
row "  again, fragmented volume" cow-32-frag "$c32" 32768 cow 32 32768
row "  QD1, fragmented volume" cow-1-frag "$c1" 8192 cow 1 8192
$P clean
echo "callgrind files: $out/cg.* (callgrind_annotate --inclusive=yes FILE)"
