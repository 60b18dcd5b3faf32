"""`nak build` logic: CMake args and env per backend, toolkit detection (against fake toolkits in a
temporary directory, so the result does not depend on this machine), errors, dry run."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from nakshatra import build
from nakshatra.build import (
    BACKENDS,
    build_plan,
    compiled_info,
    detect_toolkit,
    ggml_cmake_args,
    run_build,
)
from nakshatra.errors import BuildError

PROJECT = Path(__file__).resolve().parents[1]


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def _nvcc(path: Path, release: str = "13.0") -> Path:
    """A fake nvcc that prints a version as the real one does."""
    _exe(path).write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture(autouse=True)
def no_system_toolkits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every default install location into an empty temporary directory."""
    none = tmp_path / "nowhere"
    monkeypatch.setattr(build, "CUDA_DEFAULT", none / "cuda")
    monkeypatch.setattr(build, "ROCM_DEFAULT", none / "rocm")
    monkeypatch.setattr(build, "VULKAN_HEADER", none / "vulkan.h")
    monkeypatch.setattr(build, "VULKAN_PREFIXES", (str(none / "usr"),))
    monkeypatch.setattr(build, "SYSTEM_LIB_DIRS", (none / "lib",))
    monkeypatch.setattr(build, "DRIVER_LIB_DIRS", (none / "driver",))
    monkeypatch.setattr(build, "_site_dirs", lambda: [tmp_path / "site"])
    monkeypatch.setattr(build, "_install_dir", lambda: tmp_path / "site")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "bin").mkdir(exist_ok=True)
    return {"PATH": str(tmp_path / "bin"), **extra}


def test_cmake_args() -> None:
    assert ggml_cmake_args("cpu") == []
    assert ggml_cmake_args("cuda") == ["-DGGML_CUDA=ON"]
    assert ggml_cmake_args("rocm") == ["-DGGML_HIP=ON"]
    assert ggml_cmake_args("metal") == ["-DGGML_METAL=ON"]
    assert ggml_cmake_args("vulkan") == ["-DGGML_VULKAN=ON"]
    with pytest.raises(BuildError, match="unknown backend 'opencl'"):
        ggml_cmake_args("opencl")


def test_cmake_args_match_llama_cmake() -> None:
    text = (PROJECT / "cpp/cmake/llama.cmake").read_text()
    for backend in BACKENDS:
        assert f'set(_nak_backend_args_{backend} "{" ".join(ggml_cmake_args(backend))}")' in text


def test_cpu_always_ok(tmp_path: Path) -> None:
    assert detect_toolkit("cpu", _env(tmp_path)).ok


def test_cuda_on_path(tmp_path: Path) -> None:
    nvcc = _nvcc(tmp_path / "cuda/bin/nvcc")
    _touch(tmp_path / "cuda/lib64/libcublas.so.13")
    env = _env(tmp_path, PATH=f"{tmp_path / 'cuda/bin'}")
    st = detect_toolkit("cuda", env)
    assert st.ok and st.found == str(nvcc) and st.missing is None


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_cuda_home(tmp_path: Path, var: str) -> None:
    nvcc = _nvcc(tmp_path / "toolkit/bin/nvcc")
    _touch(tmp_path / "toolkit/targets/x86_64-linux/lib/libcublas.so")
    st = detect_toolkit("cuda", _env(tmp_path, **{var: str(tmp_path / "toolkit")}))
    assert st.ok and st.found == str(nvcc)


def test_cuda_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvcc = _nvcc(tmp_path / "usr-local-cuda/bin/nvcc")
    _touch(tmp_path / "usr-local-cuda/lib64/libcublas_static.a")
    monkeypatch.setattr(build, "CUDA_DEFAULT", tmp_path / "usr-local-cuda")
    st = detect_toolkit("cuda", _env(tmp_path))
    assert st.ok and st.found == str(nvcc)
    # found off PATH: the plan tells CMake where the compiler is; no GPU, no driver: sm_90 + PTX, no VMM
    plan = build_plan("cuda", PROJECT, env=_env(tmp_path))
    assert plan.env == {"NAKSHATRA_BACKEND": "cuda", "CUDACXX": str(nvcc),
                        "SKBUILD_BUILD_DIR": "build/{wheel_tag}-cuda",
                        "NAKSHATRA_LLAMA_CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90;-DGGML_CUDA_NO_VMM=ON"}
    assert plan.pre == [] and len(plan.notes) == 2


def test_cuda_missing(tmp_path: Path) -> None:
    st = detect_toolkit("cuda", _env(tmp_path))
    assert not st.ok and st.found is None
    assert "nvcc is not on PATH" in st.missing and "CUDA_HOME" in st.hint
    with pytest.raises(BuildError, match=r"CUDA toolkit not found: nvcc is not on PATH.*"
                                         r"install the CUDA toolkit.*CUDA_HOME"):
        build_plan("cuda", PROJECT, env=_env(tmp_path))


def test_cuda_without_cublas_takes_the_wheel(tmp_path: Path) -> None:
    """A toolkit without cuBLAS (nvcc from pip's nvidia-cuda-nvcc, as on this project's machines):
    the plan installs the nvidia-cublas wheel of the toolkit's major version, no newer minor, and
    points llama.cpp's configure at its versioned libraries and headers."""
    _nvcc(tmp_path / "bin/nvcc")
    st = detect_toolkit("cuda", _env(tmp_path))
    assert not st.ok and "cuBLAS" in st.missing and "nvidia-cublas" in st.hint
    plan = build_plan("cuda", PROJECT, env=_env(tmp_path))
    assert plan.toolkit.ok and "nvidia-cublas" in plan.toolkit.found
    root = tmp_path / "site/nvidia/cu13"
    assert plan.pre == [[sys.executable, "-m", "pip", "install", "nvidia-cublas>=13.0,<13.1"]]
    assert plan.expect == [root / "lib/libcublas.so.13", root / "lib/libcublasLt.so.13"]
    assert plan.cmake_args[:4] == ["-DGGML_CUDA=ON", f"-DCUDA_cublas_LIBRARY={root}/lib/libcublas.so.13",
                                   f"-DCUDA_cublasLt_LIBRARY={root}/lib/libcublasLt.so.13",
                                   f"-DCMAKE_CUDA_FLAGS=-I{root}/include"]
    assert any(n.startswith("cuBLAS: the CUDA 13.0 toolkit") and "nvidia-cublas" in n for n in plan.notes)
    # installed already: nothing to install, the same paths
    for lib in plan.expect:
        _touch(lib)
    again = build_plan("cuda", PROJECT, env=_env(tmp_path))
    assert again.pre == [] and again.cmake_args == plan.cmake_args


@pytest.mark.parametrize("release, requirement, rel", [
    ("13.2", "nvidia-cublas>=13.0,<13.3", "nvidia/cu13"),
    ("12.4", "nvidia-cublas-cu12", "nvidia/cublas"),
])
def test_cublas_wheel_per_release(tmp_path: Path, release: str, requirement: str, rel: str) -> None:
    _nvcc(tmp_path / "bin/nvcc", release)
    plan = build_plan("cuda", PROJECT, env=_env(tmp_path))
    major = release.split(".")[0]
    assert plan.pre[0][-1] == requirement
    assert plan.expect[0] == tmp_path / "site" / rel / "lib" / f"libcublas.so.{major}"


def test_cuda_too_old_or_unreadable(tmp_path: Path) -> None:
    _nvcc(tmp_path / "bin/nvcc", "11.8")
    with pytest.raises(BuildError, match="CUDA 11.8 is older"):
        build_plan("cuda", PROJECT, env=_env(tmp_path))
    _exe(tmp_path / "bin/nvcc")  # prints nothing
    with pytest.raises(BuildError, match="names no CUDA release"):
        build_plan("cuda", PROJECT, env=_env(tmp_path))


def test_cuda_architectures_and_driver(tmp_path: Path) -> None:
    """No GPU: sm_90 + PTX; a GPU that nvidia-smi lists: native; $CMAKE_CUDA_ARCHITECTURES or an
    explicit argument wins. No libcuda: no VMM; the driver's versioned libcuda: named to CMake."""
    _nvcc(tmp_path / "bin/nvcc")
    _touch(tmp_path / "lib64/libcublas.so.13")
    env = _env(tmp_path)
    assert build_plan("cuda", PROJECT, env=env).cmake_args[1:] == ["-DCMAKE_CUDA_ARCHITECTURES=90",
                                                                   "-DGGML_CUDA_NO_VMM=ON"]
    assert build_plan("cuda", PROJECT, env={**env, "CMAKE_CUDA_ARCHITECTURES": "86;89"}).cmake_args[1] \
        == "-DCMAKE_CUDA_ARCHITECTURES=86;89"
    _exe(tmp_path / "bin/nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\n")
    driver = _touch(tmp_path / "nowhere/driver/libcuda.so.1")
    plan = build_plan("cuda", PROJECT, env=env)
    assert plan.cmake_args[1:] == ["-DCMAKE_CUDA_ARCHITECTURES=native", f"-DCUDA_cuda_driver_LIBRARY={driver}"]
    assert any("NVIDIA H200" in n for n in plan.notes)
    assert build_plan("cuda", PROJECT, ["-DCMAKE_CUDA_ARCHITECTURES=75"], env=env).cmake_args[1:] == \
        [f"-DCUDA_cuda_driver_LIBRARY={driver}", "-DCMAKE_CUDA_ARCHITECTURES=75"]
    _touch(tmp_path / "lib64/stubs/libcuda.so")  # the toolkit's link stub: CMake finds it itself
    driver.unlink()
    assert build_plan("cuda", PROJECT, env=env).cmake_args[1:] == ["-DCMAKE_CUDA_ARCHITECTURES=native"]


def test_run_build_installs_first_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nvcc(tmp_path / "bin/nvcc")
    plan = build_plan("cuda", PROJECT, env=_env(tmp_path))
    ran = []

    class Done:
        returncode = 0

    def fake_run(argv, env, **kwargs):
        ran.append(argv)
        return Done()

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    with pytest.raises(BuildError, match=r"did not install .*libcublas\.so\.13"):
        run_build(plan)  # pip "succeeded" but the files are not where the plan points
    assert ran == plan.pre
    for lib in plan.expect:
        _touch(lib)
    ran.clear()
    assert run_build(plan) == 0 and ran == [*plan.pre, plan.argv]
    out = io.StringIO()
    run_build(plan, dry_run=True, out=out)
    assert out.getvalue().splitlines()[0] == " ".join(plan.pre[0][:-1]) + " 'nvidia-cublas>=13.0,<13.1'"


@pytest.mark.parametrize("tool", ["hipcc", "hipconfig"])
def test_rocm(tmp_path: Path, tool: str) -> None:
    _exe(tmp_path / "bin" / tool)
    assert detect_toolkit("rocm", _env(tmp_path)).ok


def test_rocm_path_and_missing(tmp_path: Path) -> None:
    st = detect_toolkit("rocm", _env(tmp_path))
    assert not st.ok and "hipcc" in st.missing and "ROCm" in st.hint
    _exe(tmp_path / "rocm/bin/hipcc")
    assert detect_toolkit("rocm", _env(tmp_path, ROCM_PATH=str(tmp_path / "rocm"))).ok
    with pytest.raises(BuildError, match="ROCm/HIP toolkit not found: hipcc"):
        build_plan("rocm", PROJECT, env=_env(tmp_path))


@pytest.mark.parametrize("tool,says", [("hipconfig", "5.2.21153-0"), ("hipcc", "HIP version: 5.2.21153-0")])
def test_rocm_older_than_llama_cpp_needs(tmp_path: Path, tool: str, says: str) -> None:
    """Debian 12's hipcc is HIP 5.2; ggml-hip needs 6.1: said before CMake would stop on it."""
    _exe(tmp_path / "bin" / tool).write_text(f"#!/bin/sh\necho '{says}'\n")
    st = detect_toolkit("rocm", _env(tmp_path))
    assert not st.ok and "HIP 5.2" in st.missing and "6.1" in st.missing
    with pytest.raises(BuildError, match="ROCm/HIP toolkit incomplete: HIP 5.2"):
        build_plan("rocm", PROJECT, env=_env(tmp_path))
    _exe(tmp_path / "bin" / tool).write_text(f"#!/bin/sh\necho '{says.replace('5.2', '6.4')}'\n")
    assert detect_toolkit("rocm", _env(tmp_path)).ok


def test_metal(tmp_path: Path) -> None:
    st = detect_toolkit("metal", _env(tmp_path), system="Linux")
    assert not st.ok and "macOS" in st.missing
    assert "xcrun" in detect_toolkit("metal", _env(tmp_path), system="Darwin").missing
    _exe(tmp_path / "bin/xcrun")
    assert detect_toolkit("metal", _env(tmp_path), system="Darwin").ok


def test_vulkan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = detect_toolkit("vulkan", _env(tmp_path))
    assert not st.ok and "glslc" in st.missing
    _exe(tmp_path / "bin/glslc")
    st = detect_toolkit("vulkan", _env(tmp_path))
    assert not st.ok and "Vulkan headers" in st.missing
    monkeypatch.setattr(build, "VULKAN_HEADER", _touch(tmp_path / "include/vulkan/vulkan.h"))
    # ggml-vulkan's CMake also asks for SPIRV-Headers (Debian: the spirv-headers package)
    st = detect_toolkit("vulkan", _env(tmp_path))
    assert not st.ok and "SPIRV-Headers" in st.missing and "spirv-headers" in st.hint
    with pytest.raises(BuildError, match="SPIRV-Headers"):
        build_plan("vulkan", PROJECT, env=_env(tmp_path))
    usr = tmp_path / "nowhere/usr"
    _touch(usr / "share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake")
    assert detect_toolkit("vulkan", _env(tmp_path)).ok


def test_vulkan_sdk_and_pkg_config(tmp_path: Path) -> None:
    sdk = tmp_path / "sdk"
    _exe(sdk / "bin/glslc")
    _touch(sdk / "include/vulkan/vulkan.h")
    _touch(sdk / "lib/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake")
    assert detect_toolkit("vulkan", _env(tmp_path, VULKAN_SDK=str(sdk))).ok
    _exe(tmp_path / "bin/glslc")
    _exe(tmp_path / "bin/pkg-config")  # fake pkg-config: `--exists vulkan` succeeds
    st = detect_toolkit("vulkan", _env(tmp_path))
    assert not st.ok and "SPIRV-Headers" in st.missing  # not in the SDK given this time
    _touch(tmp_path / "nowhere/usr/lib/x86_64-linux-gnu/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake")
    assert detect_toolkit("vulkan", _env(tmp_path)).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_env(backend: str, tmp_path: Path) -> None:
    plan = build_plan(backend, PROJECT, force=True, env=_env(tmp_path))
    assert plan.env["NAKSHATRA_BACKEND"] == backend
    # a build tree of our extension per backend: switching back and forth recompiles nothing
    assert plan.env.get("SKBUILD_BUILD_DIR") == (None if backend == "cpu" else f"build/{{wheel_tag}}-{backend}")
    assert "NAKSHATRA_LLAMA_CMAKE_ARGS" not in plan.env
    assert plan.argv == [sys.executable, "-m", "pip", "install", str(PROJECT),
                         "--force-reinstall", "--no-deps"]
    assert plan.cmake_args == ggml_cmake_args(backend)


def test_plan_extra_args(tmp_path: Path) -> None:
    _nvcc(tmp_path / "bin/nvcc")
    _touch(tmp_path / "lib64/libcublas.so")
    extra = ["-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NO_VMM=ON"]
    plan = build_plan("cuda", PROJECT, extra, verbose=True, env=_env(tmp_path))
    assert plan.toolkit.ok
    assert plan.env == {"NAKSHATRA_BACKEND": "cuda",  # nvcc on PATH: no CUDACXX
                        "SKBUILD_BUILD_DIR": "build/{wheel_tag}-cuda",
                        "NAKSHATRA_LLAMA_CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90;-DGGML_CUDA_NO_VMM=ON"}
    assert plan.argv[-1] == "-v"
    assert plan.cmake_args == ["-DGGML_CUDA=ON", *extra]


def test_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown backend"):
        build_plan("tpu", PROJECT)
    with pytest.raises(BuildError, match="no pyproject.toml"):
        build_plan("cpu", tmp_path)
    plan = build_plan("metal", PROJECT, force=True, env=_env(tmp_path))  # forced past a missing toolkit
    assert not plan.toolkit.ok and plan.env["NAKSHATRA_BACKEND"] == "metal"


def test_dry_run_prints_and_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("dry run must not run anything")

    monkeypatch.setattr(build.subprocess, "run", boom)
    plan = build_plan("cpu", PROJECT, ["-DGGML_NATIVE=OFF"])
    out = io.StringIO()
    assert run_build(plan, dry_run=True, out=out) == 0
    line = out.getvalue().strip()
    assert line == plan.command_line()
    assert line.startswith("NAKSHATRA_BACKEND=cpu NAKSHATRA_LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF ")
    assert line.endswith(f"-m pip install {PROJECT} --force-reinstall --no-deps")


def test_run_build_passes_env(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    class Done:
        returncode = 3

    def fake_run(argv, env, **kwargs):
        seen.update(argv=argv, env=env)
        return Done()

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    plan = build_plan("cpu", PROJECT)
    assert run_build(plan) == 3
    assert seen["argv"] == plan.argv and seen["env"]["NAKSHATRA_BACKEND"] == "cpu"
    assert seen["env"]["PATH"]  # the rest of the environment is kept


def test_compiled_info_matches_the_pin_and_the_patches() -> None:
    """The installed extension was built from the pinned llama.cpp with exactly the patches in
    patches/ (a stale build after a patch edit, or a build from another tree, fails here)."""
    import hashlib

    pin = {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in
           (PROJECT / "patches" / "llama.cpp.pin").read_text().splitlines()
           if "=" in line and not line.lstrip().startswith("#"))}
    patches = sorted((PROJECT / "patches").glob("*.patch"))
    assert patches, "no patches found"
    info = compiled_info()
    assert info["llama_commit"] == pin["commit"], \
        "the extension was not built from the pinned llama.cpp (patches/llama.cpp.pin): rebuild with `pip install .`"
    # fetch_llama.py: sha256 of the patch files' bytes in name order, first 12 hex digits
    want = hashlib.sha256(b"".join(p.read_bytes() for p in patches)).hexdigest()[:12]
    assert info["patch_hash"] == want, "the extension was built with other patches than patches/: rebuild it"
    assert info["patches"].split(",") == [p.name for p in patches]
    assert info["backend"] in BACKENDS and "CPU" in info["ggml_backends"]


def test_compiled_info_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    import nakshatra

    monkeypatch.setitem(sys.modules, "nakshatra._nakshatra", None)  # import fails
    monkeypatch.delattr(nakshatra, "_nakshatra", raising=False)
    with pytest.raises(BuildError, match=r"not importable.*pip install \.` .*`nak build`"):
        compiled_info()


def test_no_device_hint_names_the_vulkan_switch() -> None:
    assert "GGML_VK_VISIBLE_DEVICES=0" in build.no_device_hint("vulkan", {})
    assert build.no_device_hint("vulkan", {"GGML_VK_VISIBLE_DEVICES": "0"}) == ""
    assert build.no_device_hint("cuda", {}) == build.no_device_hint("cpu", {}) == ""
