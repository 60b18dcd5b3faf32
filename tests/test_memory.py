"""Memory as users see it: a stage reports its own pages (weight copies, KV, buffers) apart from
its file-backed ones (the mmap'd slice, reclaimable); --no-repack keeps no repacked weight copy;
--mlock locks the weights in RAM."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.gguf.synthetic import write_synthetic_llama_of_size
from nakshatra.server.local import LocalStages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def q4_0_model(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama of about 100M parameters in Q4_0 (about 54 MiB), which llama.cpp repacks on
    x86-64 CPUs."""
    return write_synthetic_llama_of_size(tmp_path_factory.mktemp("mem") / "q4_0-100M.gguf", 100e6,
                                         tokenizer_from=smollm2_path)


def _health(address: str) -> dict:
    host, port = address.rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port))
    try:
        return c.hello()["health"]
    finally:
        c.close()


def _generate(address: str) -> list[int]:
    with Chain([address]) as c:
        return [t for t, _ in c.generate_tokens(c.tokenize("Once upon a time"), 8, SamplerParams(temp=0.0))]


def test_no_repack_keeps_one_copy_of_the_weights(q4_0_model: Path) -> None:
    size = q4_0_model.stat().st_size
    own = {}
    for flag in ("", "--no-repack"):
        with LocalStages([q4_0_model], threads=1, ctx=128, max_sessions=1, cpu_lock=False,
                         extra_args=[flag] if flag else []) as ls:
            assert _generate(ls.addresses[0])  # it computes either way
            h = _health(ls.addresses[0])
            assert h["rss_anon_bytes"] + h["rss_file_bytes"] == pytest.approx(h["rss_bytes"], rel=0.02)
            own[flag] = h["rss_anon_bytes"]
    # the repacked copy of the Q4_0 matrices is gone from the stage's own memory
    assert own[""] - own["--no-repack"] > 0.4 * size, (own, size)


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="mlock of a slice needs root (RLIMIT_MEMLOCK)")
def test_mlock_locks_the_weights(q4_0_model: Path) -> None:
    """--mlock locks the mmap'd weights (llama.cpp's mmap + mlock load mode); with --no-repack
    that is every weight, since no repacked (anonymous, swappable) copy is made."""
    with LocalStages([q4_0_model], threads=1, ctx=128, max_sessions=1, cpu_lock=False,
                     extra_args=["--mlock", "--no-repack"]) as ls:
        status = Path(f"/proc/{ls.pids[0]}/status").read_text()
        locked = int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1)) * 1024
        assert locked > 0.9 * q4_0_model.stat().st_size, (locked, q4_0_model.stat().st_size)
        assert _generate(ls.addresses[0])
