"""Shared fixtures. The real models are pulled once into the Nakshatra cache (see nakshatra.gguf.models)
and reused by later runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from nakshatra.gguf import models

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Mark the module of a failing test, so :func:`_module_tmp_cleanup` keeps its folders."""
    report = yield
    module = item.getparent(pytest.Module)
    if report.failed and module is not None:
        module.stash[_FAILED] = True
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_cleanup(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Delete the folders a module's fixtures made with ``tmp_path_factory`` (slices of the real
    models, hundreds of MB each) once the module is done, unless one of its tests failed.

    Why: pytest keeps them until the session ends, and the suite's total (several GB) filled a
    CI machine's disk. Being autouse, this fixture is set up before the module's own fixtures and
    so torn down after them (their stages are stopped by then). Only module-scoped fixtures use
    ``tmp_path_factory`` here; a session-scoped one would lose its folder."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.node.stash.get(_FAILED, False):
        return
    for p in set(base.iterdir()) - before:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, tied embedding), about 98 MB."""
    return models.pull("smollm2", progress=False)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3, 18 layers, sliding window period 6, tied), about 253 MB."""
    return models.pull("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def upstream_completion():
    """Stock, unpatched llama.cpp's ``llama-completion`` (an oracle the project did not write),
    built on first use from the pristine pinned source into the Nakshatra cache and reused by
    later sessions (see nakshatra.bench.upstream). A :class:`nakshatra.bench.upstream.UpstreamBuild`."""
    from nakshatra.bench import upstream

    return upstream.ensure_completion()


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    """A not-yet-existing output directory inside the test's temporary directory."""
    return tmp_path / "out"
