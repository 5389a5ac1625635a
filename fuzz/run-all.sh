#!/usr/bin/env bash
# Builds the seed corpora, replays the saved regression inputs, then fuzzes
# every target (the on-disk decoders and virtio-blk request parsing) for N
# seconds each (default 10). Exits non-zero if any target crashes, hangs or
# fails to build. Works from any directory:
#   bash fuzz/run-all.sh 10
# Needs cargo-fuzz (cargo install cargo-fuzz --locked); runs on stable Rust
# through RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only -Z flags).
# Environment: TARGETS="node journal" to run a subset; FUZZ_LOG_DIR for the
# per-target libFuzzer logs (default fuzz/target/fuzz-logs).
set -uo pipefail

secs="${1:-10}"
case "$secs" in
    ''|*[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here" || exit 2
export RUSTC_BOOTSTRAP=1
targets="${TARGETS:-superblock node catalog journal claims lease diffstream virtio_request nbd_handshake vhost_messages}"
logs="${FUZZ_LOG_DIR:-$here/target/fuzz-logs}"
mkdir -p "$logs"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

echo "== building seed corpora"
cargo run --quiet --release --bin make_seeds -- "$here/corpus" || exit 1

echo "== building fuzz targets"
for t in $targets; do
    if ! cargo fuzz build "$t" >"$logs/$t-build.log" 2>&1; then
        grep -m5 -A5 '^error' "$logs/$t-build.log" >&2
        echo "!! build of $t failed (log: $logs/$t-build.log)" >&2
        exit 1
    fi
done
# Run the binaries just built (cargo fuzz run would rebuild first, and a
# tree being edited meanwhile would then report a build error as a crash).
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin="${CARGO_TARGET_DIR:-$here/target}/$triple/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

failed=()
for t in $targets; do
    if compgen -G "regressions/$t/*" >/dev/null; then
        echo "== $t: replaying regressions/$t"
        if ! "$bin/$t" regressions/"$t"/* >"$logs/$t-regressions.log" 2>&1; then
            grep -m1 -A1 'panicked at' "$logs/$t-regressions.log" >&2
            echo "!! $t: a saved regression input still fails (log: $logs/$t-regressions.log)" >&2
            failed+=("$t(regression)")
        fi
    fi
    echo "== $t: fuzzing for ${secs}s"
    mkdir -p "corpus/$t" "artifacts/$t"
    "$bin/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$secs" -max_len=4096 \
        -timeout=10 -print_final_stats=1 >"$logs/$t.log" 2>&1
    rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)"
    if [ "$rc" -eq 0 ]; then
        echo "   ok: ${execs:-?} executions, no crash"
    else
        grep -m1 -A1 'panicked at' "$logs/$t.log" >&2
        grep -m1 '^SUMMARY' "$logs/$t.log" >&2
        grep -m1 -o 'Test unit written to .*' "$logs/$t.log" >&2
        echo "!! $t: crashed or failed after ${execs:-?} executions (exit $rc; log: $logs/$t.log)" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all targets passed"
