"""The logic behind ``nak build --backend cuda|rocm|metal|vulkan|cpu``.

The extension is built by ``pip install <project>`` (scikit-build-core). The environment variable
``NAKSHATRA_BACKEND`` picks the ggml backend, which cpp/cmake/llama.cmake turns into
``-DGGML_CUDA=ON`` and the like; ``NAKSHATRA_LLAMA_CMAKE_ARGS`` (``;``-separated) adds arguments
to llama.cpp's configure. This module checks the toolkit first, so a missing one is named with
the way to install it instead of surfacing as a CMake error minutes into a build, and it reads
back what an installed extension was built with.

Typical use::

    plan = build_plan("cuda", Path("."), ["-DCMAKE_CUDA_ARCHITECTURES=90"])  # BuildError if no nvcc
    run_build(plan, dry_run=True)   # prints the command line
    run_build(plan)                 # runs pip; returns its exit status
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
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
VULKAN_HEADER = Path("/usr/include/vulkan/vulkan.h")
SYSTEM_LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
                   Path("/usr/lib64"), Path("/usr/lib"))


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
    """A build to run: ``argv`` (pip) with ``env`` set on top of the current environment."""

    backend: str
    argv: list[str]
    env: dict[str, str]
    toolkit: ToolkitStatus
    cmake_args: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        """The plan as one shell line, e.g. ``NAKSHATRA_BACKEND=cuda python -m pip install ...``."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(assigns + [shlex.quote(a) for a in self.argv])


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
    hipconfig on PATH, or under $ROCM_PATH or /opt/rocm. metal: macOS with xcrun. vulkan: glslc
    and the Vulkan headers (pkg-config vulkan, $VULKAN_SDK, or /usr/include/vulkan). cpu: always
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
    roots = [Path(env[v]) for v in ("CUDA_HOME", "CUDA_PATH") if env.get(v)] + [CUDA_DEFAULT]
    nvcc = _first_file([shutil.which("nvcc", path=path)] + [r / "bin" / "nvcc" for r in roots])
    if nvcc is None:
        where = ", ".join(["PATH", "$CUDA_HOME/bin", "$CUDA_PATH/bin", f"{CUDA_DEFAULT}/bin"])
        return ToolkitStatus(False, None, f"nvcc is not on PATH nor in {where}", hint)
    roots.insert(0, nvcc.resolve().parent.parent)
    lib_dirs = [d for r in dict.fromkeys(roots)
                for d in [r / "lib64", r / "lib", *sorted(r.glob("targets/*/lib"))]]
    lib_dirs += SYSTEM_LIB_DIRS
    if not any(next(d.glob(p), None) for d in lib_dirs if d.is_dir()
               for p in ("libcublas.so*", "libcublas_static.a")):
        return ToolkitStatus(False, str(nvcc), f"cuBLAS (libcublas) is not installed next to {nvcc}",
                             "install the CUDA toolkit's cuBLAS (e.g. the libcublas-dev or "
                             "cuda-libraries-dev package) or set CUDA_HOME to a complete toolkit")
    return ToolkitStatus(True, str(nvcc), None, "")


def _detect_rocm(env: Mapping[str, str], path: str) -> ToolkitStatus:
    roots = [Path(env["ROCM_PATH"])] if env.get("ROCM_PATH") else []
    roots.append(ROCM_DEFAULT)
    found = _first_file([shutil.which("hipcc", path=path), shutil.which("hipconfig", path=path)]
                        + [r / "bin" / n for r in roots for n in ("hipcc", "hipconfig")])
    if found is None:
        return ToolkitStatus(False, None,
                             f"hipcc/hipconfig is not on PATH nor in $ROCM_PATH/bin or {ROCM_DEFAULT}/bin",
                             "install ROCm (https://rocm.docs.amd.com) or set ROCM_PATH")
    return ToolkitStatus(True, str(found), None, "")


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
    return ToolkitStatus(True, f"{glslc}; {header}", None, "")


def build_plan(backend: str, project_dir: str | Path, extra_cmake_args: Sequence[str] = (), *,
               force: bool = False, verbose: bool = False,
               env: Mapping[str, str] | None = None) -> BuildPlan:
    """Plan ``python -m pip install <project_dir> --force-reinstall --no-deps`` for ``backend``.

    ``plan.env`` holds ``NAKSHATRA_BACKEND`` and, when ``extra_cmake_args`` are given,
    ``NAKSHATRA_LLAMA_CMAKE_ARGS`` (joined with ``;``); for cuda with nvcc found off PATH also
    ``CUDACXX`` (unless already set), so CMake finds the compiler. ``verbose`` adds pip's ``-v``
    (shows the compiler output). ``env`` (default ``os.environ``) is what the toolkit is looked
    up in.

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
    if not status.ok and not force:
        state = "not found" if status.found is None else "incomplete"
        raise BuildError(f"{_LABEL[backend]} {state}: {status.missing}; {status.hint} "
                         "(or force the build to try anyway)")
    plan_env = {"NAKSHATRA_BACKEND": backend}
    if extra_cmake_args:
        plan_env["NAKSHATRA_LLAMA_CMAKE_ARGS"] = ";".join(extra_cmake_args)
    if (backend == "cuda" and status.ok and "CUDACXX" not in env
            and shutil.which("nvcc", path=env.get("PATH", "")) is None):
        plan_env["CUDACXX"] = status.found
    argv = [sys.executable, "-m", "pip", "install", str(project), "--force-reinstall", "--no-deps"]
    if verbose:
        argv.append("-v")
    return BuildPlan(backend, argv, plan_env, status,
                     ggml_cmake_args(backend) + list(extra_cmake_args))


def run_build(plan: BuildPlan, dry_run: bool = False, out: TextIO | None = None) -> int:
    """Run ``plan`` and return pip's exit status. With ``dry_run`` only print
    :meth:`BuildPlan.command_line` to ``out`` (default stdout) and return 0."""
    if dry_run:
        print(plan.command_line(), file=out or sys.stdout)
        return 0
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
