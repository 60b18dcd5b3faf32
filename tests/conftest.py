"""Shared fixtures. The real models are pulled once into the Nakshatra cache (see nakshatra.gguf.models)
and reused by later runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nakshatra.gguf import models


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
