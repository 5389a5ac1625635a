#!/usr/bin/env bash
# Comparison harness in one command: raw file (fio), qcow2 (qemu-img bench,
# qemu-storage-daemon) and thinlun (engine, thinctl serve) on the same file
# system, in one run. Installs fio and qemu-utils when missing (as root,
# with apt-get), builds thinctl and the harness, and runs it; options are
# passed on (see benches/src/bin/compare/main.rs), for example
#   bash benches/compare.sh --size 2G --secs 3
#   bash benches/compare.sh --cases rr32,fw32 --only thinlun,thinlun-vhost
# Files go to $THINLUN_BENCH_DIR/compare (default /var/tmp/thinlun-bench),
# which must not be on tmpfs; results to target/compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fio >/dev/null || need+=(fio)
if ! command -v qemu-img >/dev/null || ! command -v qemu-storage-daemon >/dev/null; then
    need+=(qemu-utils)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "+ apt-get update && apt-get install -y ${need[*]}" >&2
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
    else
        echo "missing: ${need[*]}; install them (apt-get install ${need[*]})" >&2
        command -v fio >/dev/null || exit 1
    fi
fi

cargo build --release -q -p thinctl -p thinlun-benches
exec target/release/compare "$@"
