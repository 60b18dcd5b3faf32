#!/usr/bin/env bash
# The CUDA build and its tests, kept out of .ci/run (a cold CUDA build of llama.cpp is longer than
# CI's budget). Needs nvcc (CUDA 12 or 13); a GPU is optional: without one the build targets sm_90
# + compute_90 PTX and the GPU tests are skipped.
#
#   cpp/cuda/run.sh                       # build into .venv-cuda (timed twice: cold, then warm), test
#   NAK_CUDA_PYTHON=python3 cpp/cuda/run.sh   # use that interpreter's packages as they are: no venv,
#                                             # no downloads (a machine without a package index)
#
# The build is `nak build --backend cuda` (python/nakshatra/build.py): cuBLAS from the toolkit, or
# from the nvidia-cublas wheel when the toolkit has none; the compiled llama.cpp is cached in
# ~/.cache/nakshatra/llama.cpp/build-cuda-<key> like the CPU one, so the second build is warm.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -n "${NAK_CUDA_PYTHON:-}" ]; then
    py=$NAK_CUDA_PYTHON
    flags=(--no-build-isolation)
else
    venv=.venv-cuda
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py=$venv/bin/python
    flags=()
    # the project's dependencies and test extras, without building the (CPU) extension first
    "$py" - > "$venv/requirements.txt" <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))
PY
    "$py" -m pip install -q -r "$venv/requirements.txt"
fi

build() {  # nak build --backend cuda, from the source tree (nak itself needs a built extension)
    PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} "$py" -m nakshatra.build --backend cuda "${flags[@]}" "$@"
}
t=$(date +%s)
build
cold=$(( $(date +%s) - t ))
t=$(date +%s)
build
warm=$(( $(date +%s) - t ))
echo "cuda: first build ${cold} s, second (warm) build ${warm} s on $(nproc) cores"

"$py" -m nakshatra_cli.main doctor
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py "$@"
