#!/usr/bin/env bash
# The CUDA build and its tests, kept out of .ci/run (a cold CUDA build of llama.cpp is longer than
# CI's budget). Needs nvcc (CUDA 12 or 13); a GPU is optional: without one the build targets sm_90
# + compute_90 PTX and the GPU tests are skipped.
#
#   cpp/cuda/run.sh            # build into .venv-cuda (cold, then warm, both timed), then the tests
#   NAK_CUDA_VENV=DIR cpp/cuda/run.sh
#
# The build is `nak build --backend cuda` (python/nakshatra/build.py): cuBLAS from the toolkit, or
# from the nvidia-cublas wheel when the toolkit has none; the compiled llama.cpp is cached in
# ~/.cache/nakshatra/llama.cpp/build-cuda-<key> like the CPU one, so the second build is warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${NAK_CUDA_VENV:-.venv-cuda}
py=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# the project's dependencies and test extras, without building the (CPU) extension first
"$venv/bin/python" - <<'PY' > "$venv/requirements.txt"
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))
PY
"$venv/bin/pip" install -q -r "$venv/requirements.txt"

build() {  # nak build --backend cuda, from the source tree (nak needs a built extension)
    PYTHONPATH=python "$venv/bin/python" -m nakshatra.build --backend cuda "$@"
}
t=$(date +%s)
build
cold=$(( $(date +%s) - t ))
t=$(date +%s)
build
warm=$(( $(date +%s) - t ))
echo "cuda: first build ${cold} s, second (warm) build ${warm} s"

"$venv/bin/nak" doctor
"$venv/bin/python" -m pytest -q tests/test_cuda.py
