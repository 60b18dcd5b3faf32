#!/usr/bin/env bash
# Build the protocol fuzz targets (clang-14, libFuzzer + ASan + UBSan) and run each for SECONDS
# (default 60) on its seed corpus; fails on any crash, leak, broken property or sanitizer report.
#   cpp/fuzz/run.sh 600            both targets, 600 s each
#   cpp/fuzz/run.sh 600 fuzz_auth  one target
# Targets: fuzz_frames (frame cutting and every message decoder), fuzz_auth (the cluster-key
# handshake and per-frame MACs). New inputs go to build/fuzz/corpus-TARGET (not the checked-in
# seeds); a crash leaves build/fuzz/crash-* to add to cpp/fuzz/corpus once fixed.
set -euo pipefail
seconds=${1:-60}
targets=${2:-"fuzz_frames fuzz_auth"}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${NAK_FUZZ_BUILD:-$root/build/fuzz}
CXX=${CXX_FUZZ:-clang++-14}
CC=${CC_FUZZ:-clang-14}

# SHA-256 comes from the fetched llama.cpp tree, as in the main build (cpp/cmake/llama.cmake)
cache=${NAKSHATRA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nakshatra}
src=$(python3 "$root/cpp/cmake/fetch_llama.py" --project "$root" --cache "$cache" \
      --source "${NAKSHATRA_LLAMA_CPP_DIR:-}" 2>/dev/null | tail -n 1 | cut -d';' -f1)
if [ ! -f "$src/vendor/hash/sha256/sha256.c" ]; then
    echo "cpp/fuzz/run.sh: no llama.cpp source with vendor/hash/sha256 (got '$src'); build the package first" >&2
    exit 1
fi

gen=()
if command -v ninja >/dev/null; then gen=(-G Ninja); fi
cmake -S "$root/cpp/fuzz" -B "$build" "${gen[@]}" -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_C_COMPILER="$CC" \
    -DNAK_SHA256_DIR="$src/vendor/hash" >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" --target $targets -j "${NAK_FUZZ_JOBS:-2}" >/dev/null

cd "$build"
for t in $targets; do
    seeds="$root/cpp/fuzz/corpus"
    if [ "$t" = fuzz_auth ]; then seeds="$root/cpp/fuzz/corpus-auth"; fi
    mkdir -p "$build/corpus-$t"
    echo "== $t: ${seconds}s"
    # -timeout: a single input that hangs is a bug too; -rss_limit_mb: so is a hostile length that allocates
    "./$t" -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$build/" \
        "$build/corpus-$t" "$seeds"
done
