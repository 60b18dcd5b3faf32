"""The `nak` command line, run as a user runs it (a subprocess): stdout carries only the generated
text; errors are one line on stderr and exit code 1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import Chain
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages


def nak(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nakshatra_cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_run_default_model_answers_as_a_chat(smollm2_path: Path) -> None:
    r = nak("run", "--temp", "0", "-n", "24", "--threads", "2", "--ctx", "512", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "nak serve" not in r.stdout and "llama" not in r.stdout.lower()


# SmolLM2's chat template is ChatML (its tokenizer.chat_template): one user turn, then the
# assistant's turn opened
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def test_run_chain_equals_default_parts(smollm2_path: Path, tmp_path: Path) -> None:
    question, n = "What is the capital of France?", 24
    ref = _nakshatra.Reference(str(smollm2_path), n_ctx=512, n_threads=2)
    m = slice_model(smollm2_path, n_parts=2, out_dir=tmp_path, progress=False)
    with LocalStages([tmp_path / s.file for s in reversed(m.slices)], threads=2, ctx=512, max_sessions=2) as st:
        chained = nak("run", "--chain", ",".join(st.addresses), "--temp", "0", "-n", str(n), "--stats", question)
        ringed = nak("run", "--chain", ",".join(st.addresses), "--temp", "0", "-n", str(n), "--ring", question)
        raw = nak("run", "--chain", ",".join(st.addresses), "--temp", "0", "-n", str(n), "--raw",
                  "The capital of France is")
        # what the unsplit model answers: the chat-templated prompt, and the raw one
        with Chain(st.addresses) as c:
            want_chat = c.detokenize(ref.generate(c.tokenize(CHATML.format(question), parse_special=True), n))
            want_raw = c.detokenize(ref.generate(c.tokenize("The capital of France is"), n))
    local = nak("run", "--model", str(smollm2_path), "--parts", "3", "--temp", "0", "-n", str(n), "--threads", "2",
                "--ctx", "512", question)
    assert chained.returncode == 0, chained.stderr
    assert local.returncode == 0, local.stderr
    assert chained.stdout == local.stdout == ringed.stdout == want_chat + "\n"
    assert raw.returncode == 0 and raw.stdout == want_raw + "\n" != chained.stdout
    assert "decode" in chained.stderr and "tok/s" in chained.stderr


def test_run_says_why_nothing_was_generated(smollm2_path: Path) -> None:
    """A raw prompt that reads as finished: SmolLM2's greedy first token is end-of-generation.
    stdout stays empty (only the answer goes there); stderr says why and what to do."""
    r = nak("run", "--raw", "--temp", "0", "-n", "24", "--threads", "2", "--ctx", "512",
            "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "nothing generated: the first token sampled was end-of-generation" in r.stderr
    assert "drop --raw" in r.stderr


def test_seeded_run_is_repeatable(smollm2_path: Path) -> None:
    args = ("run", "--model", str(smollm2_path), "--temp", "0.8", "--seed", "42", "-n", "16", "--threads", "2",
            "--ctx", "512", "Once upon a time")
    a, b = nak(*args), nak(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.parametrize("args, needle", [
    (("run", "--chain", "127.0.0.1:1", "hi"), "127.0.0.1:1"),
    (("run", "--chain", "nonsense", "hi"), "host:port"),
    (("run", "--temp", "-1", "hi"), "--temp"),
    (("run", "-n", "0", "hi"), "-n 0"),
    (("serve", "/no/such/file.gguf"), "no such file"),
    (("slice", "/no/such/file.gguf", "--parts", "2"), "file.gguf"),
    (("run", "--model", "no-such-model", "hi"), "no-such-model"),
])
def test_errors_are_one_line(args, needle: str) -> None:
    r = nak(*args)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) <= 3, r.stderr  # rich may wrap one long line
    assert lines[0].startswith("error:")
    assert needle in r.stderr.replace("\n", "")
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_serve_refuses_open_address_without_insecure(smollm2_path: Path) -> None:
    r = nak("serve", str(smollm2_path), "--layers", "0-9", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 1
    assert "--insecure" in r.stderr


def test_serve_layers_must_match_the_slice(smollm2_path: Path, tmp_path: Path) -> None:
    m = slice_model(smollm2_path, ranges=[LayerRange(0, 10), LayerRange(10, 30)], out_dir=tmp_path, progress=False)
    r = nak("serve", str(tmp_path / m.slices[0].file), "--layers", "0-5", "--port", "0")
    assert r.returncode == 1
    assert "holds layers 0-9" in r.stderr


def test_slice_range_errors(smollm2_path: Path, tmp_path: Path) -> None:
    r = nak("slice", str(smollm2_path), "--ranges", "0-9,12-29", "-o", str(tmp_path))
    assert r.returncode == 1 and "10-11" in r.stderr
    r = nak("slice", str(smollm2_path), "--ranges", "0-9,9-29", "-o", str(tmp_path))
    assert r.returncode == 1
    r = nak("slice", str(smollm2_path), "--ranges", "0-9,10-30", "-o", str(tmp_path))
    assert r.returncode == 1 and "30" in r.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.tmp"))


def test_doctor_and_build_dry_run() -> None:
    r = nak("doctor")
    assert r.returncode == 0, r.stderr
    info = _nakshatra.build_info()
    assert info["llama_commit"] in r.stdout and "protocol" in r.stdout
    r = nak("build", "--backend", "cuda", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "GGML_CUDA=ON" in r.stderr + r.stdout
    assert "NAKSHATRA_BACKEND=cuda" in r.stderr + r.stdout


def test_build_without_toolkit_names_it(tmp_path: Path) -> None:
    import os

    env = dict(os.environ, PATH=str(tmp_path), ROCM_PATH=str(tmp_path / "none"), HIP_PATH=str(tmp_path / "none"))
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "build", "--backend", "rocm"], capture_output=True,
                       text=True, env=env, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1
    assert "hipcc" in r.stderr or "ROCm" in r.stderr


def _start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    import json

    p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "serve", *args, "--port", "0", "--ready-json",
                          "--threads", "2", "--ctx", "256", "--max-sessions", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = p.stdout.readline()
    assert line, p.stderr.read()
    info = json.loads(line)
    return p, f"127.0.0.1:{info['port']}"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_cuts_a_range_on_the_fly_and_stops_cleanly(smollm2_path: Path, sig: str) -> None:
    import signal

    from nakshatra.client.chain import Chain, SamplerParams

    a, addr_a = _start_serve(str(smollm2_path), "--layers", "0-14")
    b, addr_b = _start_serve(str(smollm2_path), "--layers", "15-29")
    try:
        with Chain([addr_b, addr_a]) as c:
            assert [str(s.layers) for s in c.stages] == ["0-14 (15 layers)", "15-29 (15 layers)"]
            prompt = c.tokenize("The capital of France is")
            got = [t for t, _ in c.generate_tokens(prompt, 12, SamplerParams(temp=0))]
        ref = _nakshatra.Reference(str(smollm2_path), n_ctx=256)
        assert got == ref.generate(prompt, 12, temp=0.0)
    finally:
        for p in (a, b):
            p.send_signal(getattr(signal, sig))
    for p, layers in ((a, "layers 0-14 (15 layers)"), (b, "layers 15-29 (15 layers)")):
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise AssertionError(f"nak serve did not stop on {sig} within 30 s") from None
        assert p.returncode == 0, err
        # each stage names its own layer range on its ready line
        assert re.search(r"ready on 127\.0\.0\.1:\d+ · " + re.escape(layers) + " of 30 ", err), err
        assert "stopped" in err
