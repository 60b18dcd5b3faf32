#!/usr/bin/env bash
# Build the protocol fuzz target (clang-14, libFuzzer + ASan + UBSan) and run it for SECONDS
# (default 60) on the seed corpus; fails on any crash, leak or sanitizer report.
#   cpp/fuzz/run.sh 600
# New inputs go to build/fuzz/corpus (not the checked-in seeds); a crash leaves
# build/fuzz/crash-* to add to cpp/fuzz/corpus once fixed.
set -euo pipefail
seconds=${1:-60}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${NAK_FUZZ_BUILD:-$root/build/fuzz}
CXX=${CXX_FUZZ:-clang++-14}

gen=()
if command -v ninja >/dev/null; then gen=(-G Ninja); fi
cmake -S "$root/cpp/fuzz" -B "$build" "${gen[@]}" -DCMAKE_CXX_COMPILER="$CXX" >/dev/null
cmake --build "$build" --target fuzz_frames -j "${NAK_FUZZ_JOBS:-2}" >/dev/null

mkdir -p "$build/corpus"
cd "$build"
# -timeout: a single input that hangs is a bug too; -rss_limit_mb: so is a hostile length that allocates
./fuzz_frames -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$build/" \
    "$build/corpus" "$root/cpp/fuzz/corpus"
