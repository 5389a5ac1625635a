#!/usr/bin/env bash
# NBD comparison, one run on one file system: fio's nbd engine against
# thinlun's export (thinctl serve --nbd) and qemu-storage-daemon's NBD
# export of a raw file and of a qcow2 file. Prints IOPS (MiB/s for 1 MiB
# cases), the ratio to qsd-raw, and each server's CPU per request.
#   bash benches/nbd.sh [SECONDS-PER-CASE]
# CASES="sr rr32" runs only the cases named (fw1 fw32 rr1 rr32 ow1 ow32 sw sr).
# BACKENDS="thinlun qsd-raw" runs only those servers (default all three).
# THINCTL=path serves thinlun with that binary instead of building one
# (for A/B runs of two builds).
# Files go to $THINLUN_BENCH_DIR/nbd (default /var/tmp/thinlun-bench; not
# tmpfs). Needs fio (with its nbd engine), qemu-img, qemu-storage-daemon.
# The pool file and the raw file are written in full once, as a LUN's
# blocks all exist, so that first writes measure the store and not the
# file system's block allocation (an O_DIRECT write into a hole cannot be
# issued inline: io_uring hands each to a kernel worker thread). The
# qcow2 file starts empty and grows, as qcow2 does on a file system.
# SPARSE=1 leaves the pool and raw files sparse, as before.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
dir=${THINLUN_BENCH_DIR:-/var/tmp/thinlun-bench}/nbd
size=1G
rm -rf "$dir"; mkdir -p "$dir"
if [ -n "${THINCTL:-}" ]; then
    T=$THINCTL
else
    cargo build --release -q -p thinctl
    T=${CARGO_TARGET_DIR:-$PWD/target}/release/thinctl
fi
export THINLUN_POOL=$dir/pool.img
full_file() { # path size-in-MiB: written in full unless SPARSE=1
    if [ -n "${SPARSE:-}" ]; then
        truncate -s "${2}M" "$1"
    else
        dd if=/dev/zero of="$1" bs=4M count=$(($2 / 4)) oflag=direct status=none
    fi
}
full_file "$dir/pool.img" 4096
full_file "$dir/raw.img" 1024

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

start_thinlun() {
    # A new pool on the same (written) file each time.
    $T pool create --force >/dev/null
    $T create vm $size >/dev/null
    $T serve vm --nbd "$dir/t.sock" 2>"$dir/t.log" &
    pid=$!; sock=$dir/t.sock; export_name=vm
}
start_qsd() { # $1: raw|qcow2
    local img=$dir/raw.img
    if [ "$1" = qcow2 ]; then
        img=$dir/q.qcow2
        rm -f "$img"
        qemu-img create -q -f qcow2 "$img" $size
    fi
    qemu-storage-daemon \
        --blockdev driver=file,node-name=f0,filename="$img",cache.direct=on,aio=io_uring \
        --blockdev driver="$1",node-name=d0,file=f0 \
        --nbd-server addr.type=unix,addr.path="$dir/q.sock" \
        --export type=nbd,id=e0,node-name=d0,name=vm,writable=on 2>"$dir/q.log" &
    pid=$!; sock=$dir/q.sock; export_name=vm
}
wait_sock() { for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.1; done; echo "no socket" >&2; exit 1; }
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

# fio job: name rw bs qd [size-limit]
job() {
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///$export_name?socket=$sock" \
        --rw="$2" --bs="$3" --iodepth="$4" --size=$size --time_based=1 --runtime="$secs" \
        --randrepeat=0 --norandommap=1 --output-format=json 2>/dev/null
}
result() { # fio json on stdin -> "iops mibps ios"
    python3 -c '
import json,sys
t=sys.stdin.read()  # fio prints "connected to NBD server" first
j=json.loads(t[t.index("{"):])["jobs"][0]
r,w=j["read"],j["write"]
print(r["iops"]+w["iops"], (r["bw_bytes"]+w["bw_bytes"])/2**20, r["total_ios"]+w["total_ios"])'
}
prefill() { fio --name=fill --ioengine=nbd --uri="nbd+unix:///$export_name?socket=$sock" \
    --rw=write --bs=1M --iodepth=4 --size=$size >/dev/null 2>&1; }

cases="fw1:randwrite:4k:1:fresh fw32:randwrite:4k:32:fresh rr1:randread:4k:1:filled rr32:randread:4k:32:filled ow1:randwrite:4k:1:filled ow32:randwrite:4k:32:filled sw:write:1M:4:fresh sr:read:1M:4:filled"
if [ -n "${CASES:-}" ]; then
    cases=$(for c in $cases; do for w in $CASES; do if [ "${c%%:*}" = "$w" ]; then echo "$c"; fi; done; done)
fi
declare -A out
backends=${BACKENDS:-qsd-raw qsd-qcow2 thinlun}
for backend in $backends; do
    for c in $cases; do
        IFS=: read -r name rw bs qd state <<<"$c"
        case $backend in
            qsd-raw) start_qsd raw ;; qsd-qcow2) start_qsd qcow2 ;; thinlun) start_thinlun ;;
        esac
        wait_sock
        [ "$state" = filled ] && prefill
        t0=$(cpu_ticks "$pid")
        read -r iops mibps ios < <(job "$name" "$rw" "$bs" "$qd" | result)
        t1=$(cpu_ticks "$pid")
        us=$(python3 -c "print(round(($t1-$t0)/$hz*1e6/max($ios,1),1))")
        out[$backend:$name]="$iops $mibps $us"
        printf '%-10s %-6s %10.0f IOPS %8.1f MiB/s %8s us/req\n' "$backend" "$name" "$iops" "$mibps" "$us"
        stop
    done
done
case " $backends " in *" qsd-raw "*) ;; *) exit 0 ;; esac
case " $backends " in *" qsd-qcow2 "*) ;; *) exit 0 ;; esac
case " $backends " in *" thinlun "*) ;; *) exit 0 ;; esac
printf '%-6s %-20s %12s %12s %12s %10s %10s %8s %8s %8s\n' case what qsd-raw qsd-qcow2 thinlun "t/raw" "t/qcow2" "us-raw" "us-qcow" "us-thin"
for c in $cases; do
    IFS=: read -r name rw bs qd state <<<"$c"
    read -r ri rm ru <<<"${out[qsd-raw:$name]}"
    read -r qi qm qu <<<"${out[qsd-qcow2:$name]}"
    read -r ti tm tu <<<"${out[thinlun:$name]}"
    if [ "$bs" = 1M ]; then a=$rm; b=$qm; t=$tm; unit=MiB/s; else a=$ri; b=$qi; t=$ti; unit=IOPS; fi
    python3 -c "
a,b,t=$a,$b,$t
print('%-6s %-20s %12.0f %12.0f %12.0f %10.2f %10.2f %8s %8s %8s' % ('$name','$rw $bs QD$qd $unit',a,b,t,t/a,t/b,'$ru','$qu','$tu'))"
done
