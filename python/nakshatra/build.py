"""The logic behind ``nak build --backend cuda|rocm|metal|vulkan|cpu``.

The extension is built by ``pip install <project>`` (scikit-build-core). The environment variable
``NAKSHATRA_BACKEND`` picks the ggml backend, which cpp/cmake/llama.cmake turns into
``-DGGML_CUDA=ON`` and the like; ``NAKSHATRA_LLAMA_CMAKE_ARGS`` (``;``-separated) adds arguments
to llama.cpp's configure. This module checks the toolkit first, so a missing one is named with
the way to install it instead of surfacing as a CMake error minutes into a build, and it reads
back what an installed extension was built with.

Typical use::

    plan = build_plan("cuda", Path("."), ["-DCMAKE_CUDA_ARCHITECTURES=90"])  # BuildError if no nvcc
    run_build(plan, dry_run=True)   # prints the command lines
    run_build(plan)                 # runs pip; returns its exit status

CUDA: a toolkit without cuBLAS (e.g. nvcc alone from pip's nvidia-cuda-nvcc) takes cuBLAS from the
``nvidia-cublas`` wheel of the toolkit's major version (installed into this environment first);
without a GPU the build targets :data:`CUDA_DEFAULT_ARCHS`, with one ``native``; without the
driver's libcuda it builds without ggml's virtual-memory pool (``GGML_CUDA_NO_VMM``), since that is
the one part that links the driver. :func:`cuda_setup` finds all of it.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .errors import BuildError

BACKENDS = ("cpu", "cuda", "rocm", "metal", "vulkan")
"""Backends ``nak build`` accepts (the values of ``NAKSHATRA_BACKEND``)."""

_GGML_ARGS = {"cpu": [], "cuda": ["-DGGML_CUDA=ON"], "rocm": ["-DGGML_HIP=ON"],
              "metal": ["-DGGML_METAL=ON"], "vulkan": ["-DGGML_VULKAN=ON"]}
_LABEL = {"cpu": "C/C++ toolchain", "cuda": "CUDA toolkit", "rocm": "ROCm/HIP toolkit",
          "metal": "Metal toolchain", "vulkan": "Vulkan SDK"}

# Default install locations, module-level so tests can point them at a temporary directory.
CUDA_DEFAULT = Path("/usr/local/cuda")
ROCM_DEFAULT = Path("/opt/rocm")
# ggml/src/ggml-hip/CMakeLists.txt at the pinned commit: "At least ROCM/HIP V6.1 is required"
ROCM_MIN = (6, 1)
VULKAN_HEADER = Path("/usr/include/vulkan/vulkan.h")
# the prefixes CMake searches for package configs on Linux and macOS (Homebrew: /opt/homebrew)
VULKAN_PREFIXES = ("/usr", "/usr/local", "/opt/homebrew")
SYSTEM_LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
                   Path("/usr/lib64"), Path("/usr/lib"))
# where NVIDIA's driver library libcuda may live besides SYSTEM_LIB_DIRS (container mounts, WSL)
DRIVER_LIB_DIRS = (Path("/usr/local/nvidia/lib64"), Path("/usr/local/nvidia/lib"), Path("/usr/lib/wsl/lib"))
CUDA_DEFAULT_ARCHS = "90"
"""CMAKE_CUDA_ARCHITECTURES when no GPU is visible at build time: sm_90 machine code plus
compute_90 PTX (CMake's plain ``90``), so a Hopper card runs it as built and newer cards JIT the PTX.
Choose others with ``-DCMAKE_CUDA_ARCHITECTURES=...`` or the environment variable of that name."""


@dataclass(frozen=True)
class ToolkitStatus:
    """Whether the toolkit a backend needs is present. ``found``: what was found (a path or a
    description), ``missing``: what is not there (None when ``ok``), ``hint``: how to install
    or point at it."""

    ok: bool
    found: str | None
    missing: str | None
    hint: str


@dataclass(frozen=True)
class BuildPlan:
    """A build to run: ``argv`` (pip) with ``env`` set on top of the current environment, after
    the commands in ``pre`` (e.g. installing cuBLAS from PyPI); ``notes``: one line each on what
    the plan decided for the user (cuBLAS source, GPU architectures, no VMM), printed by ``nak build``;
    ``expect``: files ``pre`` must have created (checked before the build)."""

    backend: str
    argv: list[str]
    env: dict[str, str]
    toolkit: ToolkitStatus
    cmake_args: list[str] = field(default_factory=list)
    pre: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    expect: list[Path] = field(default_factory=list)

    def command_line(self) -> str:
        """The plan as shell lines, e.g. ``NAKSHATRA_BACKEND=cuda python -m pip install ...``
        (each ``pre`` command on a line of its own, first)."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        lines = [" ".join(shlex.quote(a) for a in cmd) for cmd in self.pre]
        return "\n".join(lines + [" ".join(assigns + [shlex.quote(a) for a in self.argv])])


@dataclass(frozen=True)
class CudaSetup:
    """What a CUDA build uses, as :func:`cuda_setup` found it.

    ``nvcc``: the compiler; ``version``: the toolkit's (major, minor) from ``nvcc --version``;
    ``cublas``: the directory holding libcublas (toolkit, system or wheel), None when missing;
    ``cublas_wheel``: the pip requirement that provides cuBLAS when the toolkit lacks it (its files
    are then under ``wheel_root``: ``lib/`` and ``include/``); ``driver``: libcuda (the driver's, or
    the toolkit's link stub), None when neither is there; ``gpu``: the first GPU ``nvidia-smi -L``
    lists, None when none."""

    nvcc: Path
    version: tuple[int, int]
    cublas: Path | None
    cublas_wheel: str | None
    wheel_root: Path | None
    driver: Path | None
    gpu: str | None

    def wheel_libs(self) -> tuple[Path, Path]:
        """libcublas and libcublasLt as the wheel installs them (only versioned names, e.g.
        ``libcublas.so.13``; the linker takes a full path, so no unversioned link is needed)."""
        assert self.wheel_root is not None
        major = self.version[0]
        return (self.wheel_root / "lib" / f"libcublas.so.{major}",
                self.wheel_root / "lib" / f"libcublasLt.so.{major}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def ggml_cmake_args(backend: str) -> list[str]:
    """The llama.cpp CMake options that select ``backend`` (``[]`` for cpu), as
    cpp/cmake/llama.cmake passes them. Raises BuildError for an unknown backend."""
    _check_backend(backend)
    return list(_GGML_ARGS[backend])


def detect_toolkit(backend: str, env: Mapping[str, str] | None = None,
                   system: str | None = None) -> ToolkitStatus:
    """Look for what building ``backend`` needs. ``env`` defaults to ``os.environ`` (its PATH,
    CUDA_HOME, CUDA_PATH, ROCM_PATH, VULKAN_SDK are used), ``system`` to ``platform.system()``.

    cuda: nvcc on PATH, in $CUDA_HOME/bin, $CUDA_PATH/bin or /usr/local/cuda/bin, and cuBLAS
    (which ggml-cuda links) next to it or in the system library directories. rocm: hipcc or
    hipconfig on PATH, or under $ROCM_PATH or /opt/rocm. metal: macOS with xcrun. vulkan: glslc,
    the Vulkan headers (pkg-config vulkan, $VULKAN_SDK, or /usr/include/vulkan) and the
    SPIRV-Headers CMake config ($VULKAN_SDK, /usr, /usr/local or /opt/homebrew). cpu: always
    ok. Raises BuildError for an unknown backend."""
    _check_backend(backend)
    env = os.environ if env is None else env
    system = platform.system() if system is None else system
    path = env.get("PATH", "")
    return {"cpu": lambda: ToolkitStatus(True, "a C/C++ compiler (checked by CMake)", None, ""),
            "cuda": lambda: _detect_cuda(env, path),
            "rocm": lambda: _detect_rocm(env, path),
            "metal": lambda: _detect_metal(path, system),
            "vulkan": lambda: _detect_vulkan(env, path)}[backend]()


def _first_file(candidates) -> Path | None:
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _detect_cuda(env: Mapping[str, str], path: str) -> ToolkitStatus:
    hint = ("install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or your "
            "distribution's nvidia-cuda-toolkit) and put its bin/ on PATH or set CUDA_HOME")
    roots = _cuda_roots(env)
    nvcc = _find_nvcc(env, roots)
    if nvcc is None:
        where = ", ".join(["PATH", "$CUDA_HOME/bin", "$CUDA_PATH/bin", f"{CUDA_DEFAULT}/bin"])
        return ToolkitStatus(False, None, f"nvcc is not on PATH nor in {where}", hint)
    if _toolkit_cublas(_cuda_lib_dirs(nvcc, roots)) is None:
        return ToolkitStatus(False, str(nvcc), f"cuBLAS (libcublas) is not installed next to {nvcc}",
                             "nak build installs it from the nvidia-cublas wheel of the toolkit's "
                             "major version; or install the toolkit's cuBLAS (libcublas-dev, "
                             "cuda-libraries-dev) or set CUDA_HOME to a complete toolkit")
    return ToolkitStatus(True, str(nvcc), None, "")


def _find_nvcc(env: Mapping[str, str], roots: list[Path]) -> Path | None:
    return _first_file([shutil.which("nvcc", path=env.get("PATH", ""))] + [r / "bin" / "nvcc" for r in roots])


def _cuda_roots(env: Mapping[str, str]) -> list[Path]:
    return [Path(env[v]) for v in ("CUDA_HOME", "CUDA_PATH") if env.get(v)] + [CUDA_DEFAULT]


def _cuda_lib_dirs(nvcc: Path, roots: list[Path]) -> list[Path]:
    roots = [nvcc.resolve().parent.parent, *roots]
    return [d for r in dict.fromkeys(roots)
            for d in [r / "lib64", r / "lib", *sorted(r.glob("targets/*/lib"))]] + list(SYSTEM_LIB_DIRS)


def _toolkit_cublas(lib_dirs: list[Path]) -> Path | None:
    return next((d for d in lib_dirs if d.is_dir()
                 for p in ("libcublas.so*", "libcublas_static.a") if next(d.glob(p), None)), None)


def _version_output(tool: Path, env: Mapping[str, str]) -> str:
    """What ``tool --version`` prints on stdout ("" when it cannot run)."""
    try:
        return subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60,
                              env=dict(env), check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvcc_version(nvcc: Path, env: Mapping[str, str]) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    m = re.search(r"release (\d+)\.(\d+)", _version_output(nvcc, env))
    return (int(m.group(1)), int(m.group(2))) if m else None


def cublas_wheel(version: tuple[int, int]) -> tuple[str, Path]:
    """The pip requirement that provides cuBLAS for CUDA ``version`` (major, minor), and where its
    files land relative to site-packages. CUDA 13 and later: ``nvidia-cublas`` of the same major
    version and no newer minor than the toolkit's (``nvidia/cu13/{lib,include}``); CUDA 12:
    ``nvidia-cublas-cu12`` (``nvidia/cublas/...``). Raises BuildError for CUDA 11 and older."""
    major, minor = version
    if major >= 13:
        return f"nvidia-cublas>={major}.0,<{major}.{minor + 1}", Path("nvidia") / f"cu{major}"
    if major == 12:
        return "nvidia-cublas-cu12", Path("nvidia") / "cublas"
    raise BuildError(f"CUDA {major}.{minor} is older than llama.cpp supports here; install CUDA 12 or newer")


def _site_dirs() -> list[Path]:
    """Where an installed wheel's files may be: this interpreter's site-packages and sys.path."""
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys([paths["platlib"], paths["purelib"], *sys.path]) if p]


def _install_dir() -> Path:
    """Where ``python -m pip install`` puts a wheel's files for this interpreter."""
    return Path(sysconfig.get_paths()["purelib"])


def _find_driver(lib_dirs: list[Path]) -> Path | None:
    """libcuda: the driver's (needs no toolkit) or the toolkit's link stub (lib64/stubs)."""
    dirs = [*DRIVER_LIB_DIRS, *lib_dirs, *(d / "stubs" for d in lib_dirs)]
    return next((d / n for n in ("libcuda.so", "libcuda.so.1") for d in dirs if (d / n).is_file()), None)


def _visible_gpu(env: Mapping[str, str]) -> str | None:
    smi = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return first if out.returncode == 0 and first.startswith("GPU ") else None


def cuda_setup(env: Mapping[str, str] | None = None) -> CudaSetup | None:
    """Find what a CUDA build uses (see :class:`CudaSetup`); None when there is no nvcc.
    ``env`` defaults to ``os.environ``. Raises BuildError when ``nvcc --version`` names no
    release or the toolkit is older than CUDA 12."""
    env = os.environ if env is None else env
    roots = _cuda_roots(env)
    nvcc = _find_nvcc(env, roots)
    if nvcc is None:
        return None
    version = _nvcc_version(nvcc, env)
    if version is None:
        raise BuildError(f"{nvcc} --version names no CUDA release; check that this nvcc runs")
    lib_dirs = _cuda_lib_dirs(nvcc, roots)
    cublas, wheel, wheel_root = _toolkit_cublas(lib_dirs), None, None
    if cublas is None:
        wheel, rel = cublas_wheel(version)
        found = next((d / rel for d in _site_dirs() if (d / rel / "lib").is_dir()
                      and next((d / rel / "lib").glob("libcublas.so*"), None)), None)
        wheel_root = found or _install_dir() / rel
        cublas = wheel_root / "lib" if found else None
    return CudaSetup(nvcc, version, cublas, wheel, wheel_root, _find_driver(lib_dirs), _visible_gpu(env))


def _cuda_plan(setup: CudaSetup, extra: Sequence[str], env: Mapping[str, str]) -> tuple[list[str], list[list[str]],
                                                                                        list[str], list[Path]]:
    """CMake arguments, pre-build commands, notes and expected files for a CUDA build."""
    args: list[str] = []
    pre: list[list[str]] = []
    notes: list[str] = []
    expect: list[Path] = []
    given = " ".join(extra)
    if setup.cublas_wheel:
        lib, lt = setup.wheel_libs()
        if setup.cublas is None:
            pre.append([sys.executable, "-m", "pip", "install", setup.cublas_wheel])
            expect += [lib, lt]
        notes.append(f"cuBLAS: the CUDA {setup.version[0]}.{setup.version[1]} toolkit of {setup.nvcc} has none; "
                     f"taking it from the {setup.cublas_wheel!r} wheel in {setup.wheel_root}")
        args += [f"-DCUDA_cublas_LIBRARY={lib}", f"-DCUDA_cublasLt_LIBRARY={lt}",
                 f"-DCMAKE_CUDA_FLAGS=-I{setup.wheel_root / 'include'}"]
    if "CMAKE_CUDA_ARCHITECTURES" not in given:
        archs = env.get("CMAKE_CUDA_ARCHITECTURES") or ("native" if setup.gpu else CUDA_DEFAULT_ARCHS)
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        why = ("from $CMAKE_CUDA_ARCHITECTURES" if env.get("CMAKE_CUDA_ARCHITECTURES")
               else f"the GPU here ({setup.gpu})" if setup.gpu
               else "no GPU here: sm_90 code + compute_90 PTX (Hopper and newer)")
        notes.append(f"GPU architectures: {archs} ({why}; choose with -DCMAKE_CUDA_ARCHITECTURES=...)")
    if "GGML_CUDA_NO_VMM" not in given:
        if setup.driver is None:
            args.append("-DGGML_CUDA_NO_VMM=ON")
            notes.append("no NVIDIA driver (libcuda) here: built without ggml's virtual-memory pool "
                         "(GGML_CUDA_NO_VMM), the one part that links the driver")
        elif setup.driver.name != "libcuda.so":
            args.append(f"-DCUDA_cuda_driver_LIBRARY={setup.driver}")
    return args, pre, notes, expect


def _detect_rocm(env: Mapping[str, str], path: str) -> ToolkitStatus:
    roots = [Path(env["ROCM_PATH"])] if env.get("ROCM_PATH") else []
    roots.append(ROCM_DEFAULT)
    found = _first_file([shutil.which("hipcc", path=path), shutil.which("hipconfig", path=path)]
                        + [r / "bin" / n for r in roots for n in ("hipcc", "hipconfig")])
    if found is None:
        return ToolkitStatus(False, None,
                             f"hipcc/hipconfig is not on PATH nor in $ROCM_PATH/bin or {ROCM_DEFAULT}/bin",
                             "install ROCm (https://rocm.docs.amd.com) or set ROCM_PATH")
    version = _hip_version(found, env)
    if version is not None and version < ROCM_MIN:
        return ToolkitStatus(False, str(found), f"HIP {version[0]}.{version[1]} ({found}) is older than "
                             f"{ROCM_MIN[0]}.{ROCM_MIN[1]}, which the pinned llama.cpp's ggml-hip requires",
                             "install ROCm 6.1 or newer (https://rocm.docs.amd.com; Debian 12's hipcc "
                             "package is 5.2) and set ROCM_PATH")
    return ToolkitStatus(True, str(found), None, "")


def _hip_version(tool: Path, env: Mapping[str, str]) -> tuple[int, int] | None:
    """(major, minor) from ``hipconfig --version`` ("6.1.40091-a8dbc0c19") or ``hipcc
    --version`` ("HIP version: 6.1.40091-..."); None when neither says."""
    out = _version_output(tool, env)
    m = re.search(r"HIP version:\s*(\d+)\.(\d+)", out) or re.match(r"\s*(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _detect_metal(path: str, system: str) -> ToolkitStatus:
    if system != "Darwin":
        return ToolkitStatus(False, None, f"Metal needs macOS (this is {system or 'unknown'})",
                             "use --backend cuda, rocm, vulkan or cpu on this machine")
    xcrun = shutil.which("xcrun", path=path)
    if xcrun is None:
        return ToolkitStatus(False, None, "xcrun (Xcode command line tools) is not on PATH",
                             "run `xcode-select --install`")
    return ToolkitStatus(True, xcrun, None, "")


def _detect_vulkan(env: Mapping[str, str], path: str) -> ToolkitStatus:
    hint = ("install the Vulkan SDK (https://vulkan.lunarg.com) and set VULKAN_SDK, or on "
            "Debian/Ubuntu `apt install glslc libvulkan-dev`")
    sdk = Path(env["VULKAN_SDK"]) if env.get("VULKAN_SDK") else None
    glslc = _first_file([shutil.which("glslc", path=path), sdk and sdk / "bin" / "glslc"])
    if glslc is None:
        return ToolkitStatus(False, None, "glslc (the shader compiler) is not on PATH nor in "
                             "$VULKAN_SDK/bin", hint)
    header = _first_file([sdk and sdk / "include" / "vulkan" / "vulkan.h", VULKAN_HEADER])
    if header is None:
        pkg_config = shutil.which("pkg-config", path=path)
        if pkg_config and subprocess.run([pkg_config, "--exists", "vulkan"], env=dict(env),
                                         capture_output=True, check=False).returncode == 0:
            header = "pkg-config vulkan"
    if header is None:
        return ToolkitStatus(False, str(glslc), "the Vulkan headers and loader (vulkan.h, "
                             "pkg-config vulkan)", hint)
    spirv = _spirv_headers_config(sdk)
    if spirv is None:
        return ToolkitStatus(False, f"{glslc}; {header}", "SPIRV-Headers (its CMake config, "
                             "SPIRV-HeadersConfig.cmake, which ggml-vulkan asks CMake for)",
                             hint.replace("libvulkan-dev`", "libvulkan-dev spirv-headers`"))
    return ToolkitStatus(True, f"{glslc}; {header}; {spirv.parent}", None, "")


def _spirv_headers_config(sdk: Path | None) -> Path | None:
    """SPIRV-HeadersConfig.cmake where CMake's find_package looks for it: in the Vulkan SDK
    (``$VULKAN_SDK/{lib,share}/cmake``), else the system prefixes (Debian's ``spirv-headers``:
    /usr/share/cmake/SPIRV-Headers)."""
    roots = [sdk] if sdk else []
    roots += [Path(p) for p in VULKAN_PREFIXES]
    dirs = [d for r in roots for d in (r / "share" / "cmake", r / "lib" / "cmake", *sorted(r.glob("lib/*/cmake")))]
    return _first_file(d / "SPIRV-Headers" / "SPIRV-HeadersConfig.cmake" for d in dirs)


def build_plan(backend: str, project_dir: str | Path, extra_cmake_args: Sequence[str] = (), *,
               force: bool = False, verbose: bool = False,
               env: Mapping[str, str] | None = None, isolated: bool = True) -> BuildPlan:
    """Plan ``python -m pip install <project_dir> --force-reinstall --no-deps`` for ``backend``.

    ``plan.env`` holds ``NAKSHATRA_BACKEND`` and, when ``extra_cmake_args`` are given,
    ``NAKSHATRA_LLAMA_CMAKE_ARGS`` (joined with ``;``); for cuda with nvcc found off PATH also
    ``CUDACXX`` (unless already set), so CMake finds the compiler. ``verbose`` adds pip's ``-v``
    (shows the compiler output). ``env`` (default ``os.environ``) is what the toolkit is looked
    up in. ``isolated=False`` adds pip's ``--no-build-isolation``: the build uses this
    environment's scikit-build-core, pybind11, CMake and Ninja (a machine with no package index).

    Raises BuildError for an unknown backend, a ``project_dir`` without pyproject.toml, or a
    missing toolkit (message names it and how to install it) unless ``force``.
    """
    _check_backend(backend)
    env = os.environ if env is None else env
    project = Path(project_dir).resolve()
    if not (project / "pyproject.toml").is_file():
        raise BuildError(f"{project} is not the Nakshatra source tree (no pyproject.toml); "
                         "run from a checkout or pass its directory")
    status = detect_toolkit(backend, env)
    setup = cuda_setup(env) if backend == "cuda" else None
    fixable = setup is not None and setup.cublas_wheel is not None  # only cuBLAS missing: take the wheel
    if not status.ok and not force and not fixable:
        state = "not found" if status.found is None else "incomplete"
        raise BuildError(f"{_LABEL[backend]} {state}: {status.missing}; {status.hint} "
                         "(or force the build to try anyway)")
    extra = list(extra_cmake_args)
    pre: list[list[str]] = []
    notes: list[str] = []
    expect: list[Path] = []
    if setup is not None:
        cuda_args, pre, notes, expect = _cuda_plan(setup, extra, env)
        extra = cuda_args + extra
        if fixable:
            status = ToolkitStatus(True, f"{setup.nvcc}; cuBLAS from {setup.cublas_wheel}", None, "")
    plan_env = {"NAKSHATRA_BACKEND": backend}
    if backend != "cpu":
        # our extension's build tree per backend (pyproject.toml: build/{wheel_tag}), so switching
        # between the CPU and a GPU build recompiles neither
        plan_env["SKBUILD_BUILD_DIR"] = f"build/{{wheel_tag}}-{backend}"
    if extra:
        plan_env["NAKSHATRA_LLAMA_CMAKE_ARGS"] = ";".join(extra)
    if (backend == "cuda" and status.ok and "CUDACXX" not in env
            and shutil.which("nvcc", path=env.get("PATH", "")) is None):
        plan_env["CUDACXX"] = status.found
    argv = [sys.executable, "-m", "pip", "install", str(project), "--force-reinstall", "--no-deps"]
    if not isolated:
        argv.append("--no-build-isolation")
    if verbose:
        argv.append("-v")
    return BuildPlan(backend, argv, plan_env, status, ggml_cmake_args(backend) + extra, pre, notes, expect)


def plan_report(plan: BuildPlan) -> list[str]:
    """What ``nak build`` says before building: the toolkit found (or missing), each of the
    plan's notes, and the CMake arguments."""
    st = plan.toolkit
    return [f"backend {plan.backend}: toolkit " + (f"found: {st.found}" if st.ok else f"MISSING: {st.missing}"),
            *plan.notes, f"cmake args: {' '.join(plan.cmake_args) or '(none)'}"]


def run_build(plan: BuildPlan, dry_run: bool = False, out: TextIO | None = None) -> int:
    """Run ``plan``'s ``pre`` commands, then its build, and return the first non-zero exit
    status (0 when all succeed). With ``dry_run`` only print :meth:`BuildPlan.command_line` to
    ``out`` (default stdout) and return 0. Raises BuildError when ``pre`` succeeded but a file it
    should have installed is missing (e.g. pip installed the cuBLAS wheel somewhere else)."""
    if dry_run:
        print(plan.command_line(), file=out or sys.stdout)
        return 0
    for cmd in plan.pre:
        rc = subprocess.run(cmd, env={**os.environ, **plan.env}, check=False).returncode
        if rc != 0:
            return rc
    missing = [str(p) for p in plan.expect if not p.is_file()]
    if missing:
        raise BuildError(f"{' '.join(plan.pre[-1])} did not install {', '.join(missing)}; install the "
                         "wheel into this environment (a virtual environment) and run nak build again")
    return subprocess.run(plan.argv, env={**os.environ, **plan.env}, check=False).returncode


def compiled_info() -> dict:
    """What the installed extension was built with: ``backend``, ``llama_commit``,
    ``patch_hash``, ``protocol_version``, ``ggml_backends`` (from ``nakshatra._nakshatra.
    build_info()``). Raises BuildError when the extension is not importable."""
    try:
        from . import _nakshatra  # type: ignore[attr-defined]
    except ImportError as e:
        raise BuildError(f"the compiled extension nakshatra._nakshatra is not importable ({e}); "
                         "build it with `pip install .` in the source tree or `nak build`") from e
    return dict(_nakshatra.build_info())


def no_device_hint(backend: str, env: Mapping[str, str] | None = None) -> str:
    """Why a ``backend`` build may see no GPU, for ``nak doctor`` (``""`` when there is nothing
    to add). Vulkan: ggml-vulkan uses only discrete and integrated GPUs unless
    ``GGML_VK_VISIBLE_DEVICES`` lists device indices, so a software device (Mesa's lavapipe on
    a machine without a GPU) needs ``GGML_VK_VISIBLE_DEVICES=0``."""
    env = os.environ if env is None else env
    if backend == "vulkan" and not env.get("GGML_VK_VISIBLE_DEVICES"):
        return (" (ggml-vulkan skips CPU-type Vulkan devices such as Mesa's lavapipe; "
                "GGML_VK_VISIBLE_DEVICES=0 uses the first Vulkan device, whatever its type)")
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nakshatra.build --backend cuda [-D ARG ...] [--dry-run]``: ``nak build`` for a
    checkout where no extension is built yet (``nak`` itself imports it). Returns the exit status."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nakshatra.build", description=main.__doc__)
    ap.add_argument("--backend", "-b", default="cpu", choices=BACKENDS)
    ap.add_argument("-D", "--cmake-arg", action="append", default=[], help="e.g. -D CMAKE_CUDA_ARCHITECTURES=86")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    ap.add_argument("--no-build-isolation", action="store_true",
                    help="use this environment's build packages (no package index needed)")
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2])
    a = ap.parse_args(argv)
    extra = [x if x.startswith("-") else f"-D{x}" for x in a.cmake_arg]
    try:
        plan = build_plan(a.backend, a.source, extra, force=a.force or a.dry_run, verbose=a.verbose,
                          isolated=not a.no_build_isolation)
        for line in plan_report(plan):
            print(line, file=sys.stderr)
        return run_build(plan, dry_run=a.dry_run)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
