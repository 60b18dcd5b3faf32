"""Issue 18: swapping the model a running cluster serves, through ``nak api``. SmolLM2 and Gemma 3
on the same three local stages: each model, once loaded, answers exactly as its unsplit model
(greedy); a stream running when a swap is asked for ends with the old model's exact text, and a
request arriving meanwhile waits or gets 503 with Retry-After; a swap that cannot happen (a
missing or corrupt slice, a stage that dies while loading, a slice that does not fit in its
host's memory) leaves every stage on the old model, and the error names the stage and why."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nakshatra import _nakshatra
from nakshatra.bench.hostemu import MemoryLimit, cgroup_memory_missing
from nakshatra.client.chain import Chain
from nakshatra.client.swap import control
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages

pytestmark = pytest.mark.slow

CTX = 512
SMOL = [LayerRange(0, 9), LayerRange(9, 21), LayerRange(21, 30)]
GEMMA = [LayerRange(0, 6), LayerRange(6, 12), LayerRange(12, 18)]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def slices(smollm2_path: Path, gemma3_path: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("swap")
    sm = slice_model(smollm2_path, SMOL, out_dir=out, progress=False)
    gm = slice_model(gemma3_path, GEMMA, out_dir=out, progress=False)
    return out, [out / s.file for s in sm.slices], [out / s.file for s in gm.slices]


def _stages(smol: list[Path], replica: bool = False) -> LocalStages:
    """SmolLM2's three stages (and a replica of the middle one), batching off: a session then
    equals its run alone."""
    return LocalStages(smol + ([smol[1]] if replica else []), threads=1, ctx=CTX, max_sessions=3,
                       extra_args=["--max-batch", "1"], cpu_lock=False)


def _cluster(path: Path, addresses: list[str], models: dict[str, tuple[str, list[LayerRange], list[str]]],
             replica: str = "") -> Path:
    """A cluster file: SmolLM2 on the three stages (``replica``: a replica of the middle one),
    and ``models``: name -> (model, ranges, slice files in the file's folder)."""
    body = f'name = "smollm2"\nmodel = "smollm2"\nslices_dir = "{path.parent}"\n'
    for addr, rng in zip(addresses, SMOL):
        host, port = addr.rsplit(":", 1)
        body += (f'[[stages]]\nhost = "{host}"\nport = {port}\nlayers = "{rng.inclusive()}"\n'
                 f'slice = "smollm2.{rng.start}-{rng.end - 1}.gguf"\n')
        if replica and rng == SMOL[1]:
            body += f'replicas = ["{replica}"]\n'
    for name, (model, ranges, files) in models.items():
        body += f'[[models]]\nname = "{name}"\nmodel = "{model}"\nlayers = {json.dumps([r.inclusive() for r in ranges])}\n'
        if files:
            body += f"slices = {json.dumps(files)}\n"
    path.write_text(body)
    return path


def _gemma_cluster(path: Path, addresses: list[str], gemma: list[Path], replica: str = "") -> Path:
    """The cluster file of the tests: SmolLM2 loaded, Gemma 3 (its slices, cut already) available."""
    return _cluster(path, addresses, {"gemma": ("gemma3-270m", GEMMA, [p.name for p in gemma])}, replica=replica)


@contextlib.contextmanager
def _api(cluster: Path, *args: str):
    """`nak api --cluster FILE --port 0 ...` as a user starts it; yields its base URL."""
    p = subprocess.Popen([sys.executable, "-m", "nakshatra_cli", "api", "--cluster", str(cluster), "--port", "0",
                          "--parallel", "2", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://"), f"nak api did not start: {url!r} {p.stderr.read() if p.poll() is not None else ''}"
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()


def _expected(addresses: list[str], model_path: Path, prompt: str, n: int) -> str:
    """The unsplit model's greedy text for ``prompt`` (tokenized and detokenized by the stages,
    which must serve that model now)."""
    ref = _nakshatra.Reference(str(model_path), n_ctx=CTX, n_threads=1)
    with Chain(addresses) as c:
        return c.detokenize(ref.generate(c.tokenize(prompt), n))


def _complete(url: str, model: str, n: int, prompt: str = PROMPT) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=300,
                      json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})


def _load(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/api/models/{model}/load", timeout=600)


def _states(url: str) -> list[tuple[str, str]]:
    return [(m["id"], m["state"]) for m in httpx.get(url + "/v1/models").json()["data"]]


def _stream(url: str, model: str, n: int, on_chunk=None) -> tuple[str, dict | None]:
    """A streamed completion: (its text, the error it ended with or None)."""
    texts, error = [], None
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                error = d["error"]
                continue
            texts.extend(c["text"] for c in d["choices"])
            if on_chunk:
                on_chunk(len(texts))
    return "".join(texts), error


def _wait_swap_state(url: str, states: tuple[str, ...], timeout_s: float = 120.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        swap = httpx.get(url + "/api/models").json()["swap"] or {}
        if swap.get("state") in states:
            return swap
        time.sleep(0.02)
    raise AssertionError(f"the swap never reached {states}")


def test_swap_by_api_and_by_name_serves_each_model_exactly(slices, smollm2_path, gemma3_path, tmp_path) -> None:
    out, smol, gemma = slices
    with _stages(smol) as ls:
        want_smol = _expected(ls.addresses, smollm2_path, PROMPT, 16)
        cf = _gemma_cluster(out / "c1.toml", ls.addresses, gemma)
        with _api(cf) as url:
            assert _states(url) == [("smollm2", "loaded"), ("gemma", "available")]
            r = _complete(url, "gemma", 8)
            assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_loaded", r.text
            r = _load(url, "gemma")
            assert r.status_code == 200, r.text
            swap = r.json()["swap"]
            assert swap["state"] == "done" and [s["state"] for s in swap["stages"]] == ["done"] * 3
            assert swap["report"]["load_ms"] > 0 and swap["report"]["switch_ms"] > 0
            assert _states(url) == [("gemma", "loaded"), ("smollm2", "available")]
            want_gemma = _expected(ls.addresses, gemma3_path, PROMPT, 16)
            r = _complete(url, "gemma", 16)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_gemma, r.text
            # Gemma 3 270M's GGUF has no chat template: llama.cpp's built-in "gemma" one is used
            r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": "gemma", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
            # every stage freed the old slice: nothing waits beside the new one
            for a in ls.addresses:
                st = control(a, {"op": "status"}, None)
                assert st["state"] == "idle" and st["pending"] is None and st["active"]["layers"] in {
                    r.inclusive() for r in GEMMA}
            r = _load(url, "smollm2")
            assert r.status_code == 200, r.text
            r = _complete(url, "smollm2", 16)
            assert r.json()["choices"][0]["text"] == want_smol
        # Ollama's way: a request that names an available model loads it first
        with _api(cf, "--auto-swap") as url:
            r = _complete(url, "gemma", 16)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_gemma, r.text
            assert _states(url) == [("gemma", "loaded"), ("smollm2", "available")]


def test_a_stream_finishes_on_the_old_model_and_requests_wait_for_the_swap(slices, smollm2_path, gemma3_path) -> None:
    out, smol, gemma = slices
    with _stages(smol) as ls:
        want_smol = _expected(ls.addresses, smollm2_path, PROMPT, 64)
        cf = _gemma_cluster(out / "c2.toml", ls.addresses, gemma)
        with _api(cf, "--swap-wait", "0.5") as url:
            loaded: list[httpx.Response] = []
            started = threading.Event()
            probe: list[httpx.Response] = []

            def swap() -> None:
                loaded.append(_load(url, "gemma"))

            def on_chunk(n: int) -> None:
                if n == 3 and not started.is_set():
                    started.set()
                    threading.Thread(target=swap).start()
                    _wait_swap_state(url, ("loading", "draining"))
                    probe.append(_complete(url, "smollm2", 4))  # waits 0.5 s, then 503

            text, error = _stream(url, "smollm2", 64, on_chunk)
            assert error is None and text == want_smol
            end = time.monotonic() + 300
            while not loaded and time.monotonic() < end:
                time.sleep(0.05)
            assert loaded and loaded[0].status_code == 200, loaded and loaded[0].text
            assert probe[0].status_code == 503 and probe[0].json()["error"]["code"] == "model_loading"
            assert int(probe[0].headers["retry-after"]) >= 1
            want_gemma = _expected(ls.addresses, gemma3_path, PROMPT, 16)
            r = _complete(url, "gemma", 16)
            assert r.json()["choices"][0]["text"] == want_gemma


def test_the_drain_bound_ends_a_long_generation_with_its_text(slices, smollm2_path) -> None:
    out, smol, gemma = slices
    with _stages(smol) as ls:
        want_smol = _expected(ls.addresses, smollm2_path, PROMPT, 400)
        cf = _gemma_cluster(out / "c3.toml", ls.addresses, gemma)
        with _api(cf, "--drain", "0.5") as url:
            loaded: list[httpx.Response] = []

            def on_chunk(n: int) -> None:
                if n == 3:
                    threading.Thread(target=lambda: loaded.append(_load(url, "gemma"))).start()

            text, error = _stream(url, "smollm2", 400, on_chunk)
            assert error is not None and error["code"] == "model_swapped", error
            assert "gemma" in error["message"] and error["text_so_far"] == text
            assert len(text) < len(want_smol) and want_smol.startswith(text)
            end = time.monotonic() + 300
            while not loaded and time.monotonic() < end:
                time.sleep(0.05)
            assert loaded[0].status_code == 200, loaded[0].text


def test_a_missing_or_corrupt_slice_leaves_the_old_model_serving(slices, smollm2_path, tmp_path) -> None:
    out, smol, gemma = slices
    broken = out / "damaged.6-11.gguf"  # the middle slice with bytes of its last tensor flipped
    shutil.copy(gemma[1], broken)
    with open(broken, "r+b") as f:
        f.seek(-4096, os.SEEK_END)
        data = f.read(64)
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in data))
    with _stages(smol) as ls:
        want_smol = _expected(ls.addresses, smollm2_path, PROMPT, 16)
        cf = _cluster(out / "c4.toml", ls.addresses, {
            "missing": (str(tmp_path / "nowhere.gguf"), GEMMA, []),
            "corrupt": ("gemma3-270m", GEMMA, [gemma[0].name, broken.name, gemma[2].name]),
        })
        with _api(cf) as url:
            r = _load(url, "missing")
            assert r.status_code == 502 and r.json()["error"]["code"] == "swap_failed", r.text
            msg = r.json()["error"]["message"]
            assert ls.addresses[0] in msg and "nowhere.gguf" in msg and "no such file" in msg, msg
            r = _load(url, "corrupt")
            assert r.status_code == 502, r.text
            msg = r.json()["error"]["message"]
            assert ls.addresses[1] in msg and broken.name in msg and "re-run nak slice" in msg, msg
            assert _states(url)[0] == ("smollm2", "loaded")
            for a in ls.addresses:  # no stage keeps a slice of the failed swap loaded
                st = control(a, {"op": "status"}, None)
                assert st["pending"] is None and st["active"]["layers"] in {r.inclusive() for r in SMOL}
            r = _complete(url, "smollm2", 16)
            assert r.json()["choices"][0]["text"] == want_smol


def test_a_stage_that_dies_while_loading_rolls_every_stage_back(slices, smollm2_path) -> None:
    out, smol, gemma = slices
    with _stages(smol, replica=True) as ls:
        primaries, replica = ls.addresses[:3], ls.addresses[3]
        want_smol = _expected(primaries, smollm2_path, PROMPT, 16)
        cf = _gemma_cluster(out / "c5.toml", primaries, gemma, replica=replica)
        with _api(cf) as url:
            loaded: list[httpx.Response] = []
            t = threading.Thread(target=lambda: loaded.append(_load(url, "gemma")))
            t.start()
            swap = _wait_swap_state(url, ("loading",))
            while not any(s["address"] == replica and s["state"] in ("preparing", "loading")
                          for s in swap.get("stages", [])):
                swap = _wait_swap_state(url, ("loading",))
            os.kill(ls.pids[3], signal.SIGKILL)
            t.join(timeout=300)
            r = loaded[0]
            assert r.status_code == 502, r.text
            assert replica in r.json()["error"]["message"], r.text
            for a in primaries:
                st = control(a, {"op": "status"}, None)
                assert st["pending"] is None and st["active"]["layers"] in {r.inclusive() for r in SMOL}
            r = _complete(url, "smollm2", 16)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_smol, r.text


@pytest.mark.skipif(bool(cgroup_memory_missing()), reason=cgroup_memory_missing() or "")
def test_a_swap_that_does_not_fit_is_refused_before_anything_is_unloaded(slices, smollm2_path) -> None:
    out, smol, gemma = slices
    with _stages(smol) as ls:
        want_smol = _expected(ls.addresses, smollm2_path, PROMPT, 16)
        cf = _gemma_cluster(out / "c6.toml", ls.addresses, gemma)
        # the last stage's host has 200 MiB left: Gemma's last slice (its tied embedding is the LM head) needs more
        group = MemoryLimit(200 << 20)
        try:
            group.add(ls.pids[2])
            with _api(cf) as url:
                r = _load(url, "gemma")
                assert r.status_code == 502, r.text
                msg = r.json()["error"]["message"]
                assert ls.addresses[2] in msg and "short by" in msg and "MiB" in msg, msg
                print(f"\nrefused: {msg}")
                assert _states(url)[0] == ("smollm2", "loaded")
                r = _complete(url, "smollm2", 16)
                assert r.json()["choices"][0]["text"] == want_smol
        finally:
            group.close()


def test_control_requests_are_checked_and_a_load_can_be_cancelled(slices, gemma3_path) -> None:
    """The stage's side (nakshatra.server.swap) on its own: bad requests get a clear refusal and
    change nothing; a load released while it runs is cancelled; a stage started with --no-swap
    refuses CONTROL frames."""
    from nakshatra.errors import StageError

    out, smol, gemma = slices
    with _stages(smol) as ls:
        a = ls.addresses[0]
        assert control(a, {"op": "status"}, None)["state"] == "idle"
        for req, needle in (({"op": "explode"}, "unknown CONTROL op"), ({"op": "prepare"}, "needs 'model'"),
                            ({"op": "swap"}, "nothing to swap to")):
            r = control(a, req, None)
            assert not r["ok"] and needle in r["error"], r
        r = control(a, {"op": "prepare", "model": str(gemma[0]), "layers": "0-5"}, None)
        assert r["ok"] and r["state"] == "preparing", r
        again = control(a, {"op": "prepare", "model": str(gemma[0]), "layers": "0-5"}, None)
        assert not again["ok"] and "already runs" in again["error"]
        r = control(a, {"op": "release"}, None)
        assert r["ok"] and r["state"] == "idle" and r["pending"] is None
        end = time.monotonic() + 120
        while time.monotonic() < end:  # the cancelled load's thread ends; nothing was swapped
            st = control(a, {"op": "status"}, None)
            r = control(a, {"op": "prepare", "model": str(gemma[0]), "layers": "0-5"}, None)
            if r["ok"]:
                break
            assert "still stopping" in r["error"], r
            time.sleep(0.1)
        assert st["active"]["layers"] == SMOL[0].inclusive()
        end = time.monotonic() + 120
        while control(a, {"op": "status"}, None)["state"] not in ("ready", "failed") and time.monotonic() < end:
            time.sleep(0.1)
        assert control(a, {"op": "status"}, None)["state"] == "ready"
        assert control(a, {"op": "release"}, None)["pending"] is None
        with Chain(ls.addresses) as c:  # still SmolLM2, still answering
            assert c.stages[0].arch == "llama"
    with LocalStages(smol[:1], threads=1, ctx=CTX, max_sessions=1, extra_args=["--no-swap"], cpu_lock=False) as one:
        with pytest.raises(StageError, match="takes no CONTROL"):
            control(one.addresses[0], {"op": "status"}, None)


def test_a_keyed_stage_swaps_only_for_a_client_with_the_key(smollm2_path, gemma3_path, tmp_path) -> None:
    """CONTROL frames pass the cluster key's handshake and MACs like every other frame: a client
    without the key cannot ask for a swap; with it, a stage serving a whole model moves to another."""
    from nakshatra.auth import generate_key_file
    from nakshatra.client.swap import swap_stages
    from nakshatra.errors import StageError

    key = generate_key_file(tmp_path / "cluster.key")
    with LocalStages([smollm2_path], threads=1, ctx=CTX, max_sessions=1, cpu_lock=False,
                     key_file=tmp_path / "cluster.key") as ls:
        a = ls.addresses[0]
        with pytest.raises(StageError, match="unauthorized|key"):
            control(a, {"op": "status"}, None)
        assert control(a, {"op": "status"}, key)["active"]["layers"] == "0-29"
        swap_stages([(a, {"model": str(gemma3_path), "layers": None})], key=key)
        with Chain(ls.addresses, key=key) as c:
            assert c.stages[0].arch == "gemma3" and c.stages[0].n_layer_full == 18
