#!/usr/bin/env bash
# A GPU build and its tests, kept out of .ci/run (a cold GPU build of llama.cpp is longer than
# CI's budget). A GPU is optional: without one the build still completes and the GPU tests are
# skipped (CUDA: sm_90 + compute_90 PTX), except that Vulkan runs on Mesa's lavapipe, a Vulkan
# device on the CPU, when nothing better is there.
#
#   cpp/gpu/run.sh cuda                       # build into .venv-cuda (timed twice: cold, then warm), test
#   cpp/gpu/run.sh vulkan                     # the same for Vulkan, into .venv-vulkan
#   NAK_GPU_PYTHON=python3 cpp/gpu/run.sh cuda    # use that interpreter's packages as they are: no
#                                                 # venv, no downloads (a machine without a package index)
#
# Needs: cuda: nvcc (CUDA 12 or 13); vulkan: glslc, the Vulkan headers and loader, SPIRV-Headers
# (Debian/Ubuntu: apt install glslc libvulkan-dev spirv-headers; for lavapipe mesa-vulkan-drivers).
# The build is `nak build --backend <backend>` (python/nakshatra/build.py); the compiled llama.cpp
# is cached in ~/.cache/nakshatra/llama.cpp/build-<backend>-<key> like the CPU one, so the second
# build is warm. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
backend=${1:?usage: cpp/gpu/run.sh cuda|vulkan [pytest args]}
shift

if [ -n "${NAK_GPU_PYTHON:-}" ]; then
    py=$NAK_GPU_PYTHON
    flags=(--no-build-isolation)
else
    venv=.venv-$backend
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

if [ "$backend" = vulkan ] && [ -z "${GGML_VK_VISIBLE_DEVICES:-}" ] && command -v vulkaninfo > /dev/null; then
    # ggml skips CPU-type Vulkan devices unless they are named; name lavapipe when it is all there is
    types=$(XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} vulkaninfo --summary 2>/dev/null | grep -o "PHYSICAL_DEVICE_TYPE_[A-Z_]*" || true)
    if [ -n "$types" ] && ! grep -qv PHYSICAL_DEVICE_TYPE_CPU <<< "$types"; then
        export GGML_VK_VISIBLE_DEVICES=0
        echo "vulkan: no Vulkan GPU here, only a software device (lavapipe): GGML_VK_VISIBLE_DEVICES=0"
    fi
fi

build() {  # nak build --backend <backend>, from the source tree (nak itself needs a built extension)
    PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} "$py" -m nakshatra.build --backend "$backend" "${flags[@]}"
}
t=$(date +%s)
build
cold=$(( $(date +%s) - t ))
t=$(date +%s)
build
warm=$(( $(date +%s) - t ))
echo "$backend: first build ${cold} s, second (warm) build ${warm} s on $(nproc) cores"

"$py" -m nakshatra_cli.main doctor
"$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py "$@"
