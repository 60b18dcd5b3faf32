#!/usr/bin/env bash
# Build nakshatra._nakshatra with ASan + UBSan on our C++ (NAKSHATRA_SANITIZE=ON; the cached
# llama.cpp is reused as it is) into its own virtual environment and build dir, then run the
# protocol tests and a pipeline test under the sanitizers. The stage processes the tests start
# inherit the environment, so they run sanitized too. Fails on any test failure or report.
#   cpp/sanitize/run.sh                 # the default selection below
#   cpp/sanitize/run.sh tests/test_x.py # other pytest arguments
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=${NAK_SANITIZE_VENV:-$root/build/sanitize-venv}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# a build dir of its own: the normal build's objects must not be reused without the flags
NAKSHATRA_SANITIZE=ON "$venv/bin/pip" install -q ".[test]" -C "build-dir=build/sanitize/{wheel_tag}"

# the protocol and authentication tests, and the pipeline in relay, forwarding and ring modes and
# with batched sessions, on short prompts (the long-prompt equality tests take minutes on 2 cores)
if [ $# -eq 0 ]; then
    set -- tests/test_protocol.py tests/test_chain.py tests/test_batching.py tests/test_auth.py \
        -k "test_protocol or (exact_smollm2 and 3-stage) or concurrent_sessions or forwarding_reports or ring_stops or batch or auth or key or mac"
fi

# Python itself is not built with ASan: the runtimes must be loaded before it, and its own
# allocations "leak" by design (detect_leaks=0). A UBSan report halts the process.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
