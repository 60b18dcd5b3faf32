"""Measure a stage's memory footprint: the smallest cgroup memory limit under which it completes
a full-context generation, exactly and without thrashing.

``python -m nakshatra.bench.footprint MODEL --parts 3 --ctx 512`` (root, cgroup v1 memory controller at
/sys/fs/cgroup/memory, no swap): the model is cut into ``--parts`` slices (``nak slice``, cached);
for each stage in turn the other stages run unconstrained, and the stage under test runs as
``python -m nakshatra.server.serve`` (what ``nak serve`` runs) inside a memory cgroup
(:class:`nakshatra.bench.hostemu.MemoryLimit`). One trial:

1. drop the stage's slice from the page cache (``posix_fadvise(DONTNEED)``): file pages already
   cached are charged to whichever group touched them first, so a slice left cached by an
   earlier trial would come out free;
2. start the stage in a fresh group with ``memory.limit_in_bytes`` = the limit tried;
3. feed a prompt of ``ctx - n_generate + 1`` tokens in one batch, then generate greedily (end of
   generation ignored) until the session's ``--ctx`` positions are full (``n_generate`` tokens),
   through the client-relayed chain;
4. the trial **fits** when the stage answered every step, the tokens equal those of the
   unconstrained run, and over the second half of the generation the group took no more major
   page faults than the unconstrained run plus :data:`THRASH_FAULTS`. Past the point where its
   weights' file pages no longer fit, a stage does not die: it re-reads weights from disk every
   token (thrashing), which these faults count. A stage the kernel OOM-kills (``memory.oom_control``
   ``oom_kill``, the process killed by SIGKILL), that stops answering, or that runs past
   ``max(180 s, 6 x`` the unconstrained run) does not fit either; each outcome is reported.

The limit is bisected to ``--resolution-mib`` (4 MiB) between a limit that fails and one that
fits, found from 0.9x and 1.1x the prediction (each moved by half until it fails / fits): the
result does not depend on the prediction, only the number of trials does. The footprint is
the smallest limit that fit. Beside it the tool prints what :mod:`nakshatra.gguf.memory` predicts for
the stage and the ratio.

What the measurement leaves out: pages of shared libraries (Python, the extension module) that
the other stages already hold are charged to them, not to the stage under test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import NakError

MIB = 1 << 20
THRASH_FAULTS = 4
"""Major page faults over the second half of the generation that a fitting stage may take beyond
the unconstrained run's. A stage that fits takes none once its weights are in; one that does not
re-reads weights every token (16 tokens in the second half at the default 32 generated), so even
one fault every other token exceeds this."""

PROMPT_TEXT = ("The night sky holds thousands of stars that the eye can see, and a telescope shows "
               "millions more. Each one is a sun, some far larger than ours, some smaller and cooler. ")


def drop_file_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to drop ``path``'s clean pages from the page cache (``posix_fadvise``
    ``POSIX_FADV_DONTNEED`` on the whole file). Pages a running process maps stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def full_context_prompt(tokenize, ctx: int, n_generate: int) -> list[int]:
    """``ctx - n_generate + 1`` prompt tokens (English text, repeated), so that the prompt and the
    ``n_generate - 1`` generated tokens fed back fill exactly ``ctx`` positions. ``tokenize``:
    text -> token ids (e.g. :meth:`nakshatra.client.chain.Chain.tokenize`). Raises NakError if
    ``n_generate`` is not in 2..ctx."""
    if not 2 <= n_generate <= ctx:
        raise NakError(f"--n-generate {n_generate} must be in 2..--ctx ({ctx})")
    want = ctx - n_generate + 1
    text = PROMPT_TEXT
    toks = tokenize(text)
    while len(toks) < want:
        text += PROMPT_TEXT
        toks = tokenize(text)
    return toks[:want]


@dataclass
class Trial:
    """One run of the stage under a limit (``limit_bytes``; None: unconstrained). ``outcome``:
    ``fits``, ``oom`` (killed by the OOM killer, or exited while loading), ``thrash`` (too many
    major faults, or past the deadline), ``wrong`` (other tokens) or ``error``; ``steady_faults``:
    the group's major faults over the second half of the generation; ``peak_bytes``: its
    ``memory.max_usage_in_bytes``; ``seconds``: wall time from start to the end of the
    generation."""

    limit_bytes: int | None
    outcome: str
    seconds: float
    steady_faults: int = 0
    peak_bytes: int = 0
    oom_kills: int = 0
    detail: str = ""


@dataclass
class StageFootprint:
    """The measured footprint of stage ``index`` (``layers``: inclusive text) of a chain:
    ``footprint_bytes`` (smallest limit that fit), ``unconstrained_peak_bytes``, the
    ``predicted`` breakdown (:func:`nakshatra.gguf.memory.predict_stage`, bytes), and every trial."""

    index: int
    slice: str
    layers: str
    footprint_bytes: int
    unconstrained_peak_bytes: int
    predicted: dict
    trials: list[Trial] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Predicted over measured footprint."""
        return self.predicted["total_bytes"] / self.footprint_bytes if self.footprint_bytes else float("nan")


class _Chain:
    """The chain of one measurement: every stage but ``index`` runs unconstrained for the whole
    bisection; the stage under test is started afresh, in its own group, for every trial."""

    def __init__(self, slices: Sequence[Path], index: int, ctx: int, max_sessions: int, threads: int) -> None:
        from ..server.local import LocalStages

        self.slices = list(slices)
        self.index = index
        self.ctx, self.max_sessions, self.threads = ctx, max_sessions, threads
        others = [s for i, s in enumerate(self.slices) if i != index]
        self.others = LocalStages(others, threads=threads, ctx=ctx, max_sessions=max_sessions, cpu_lock=False) \
            if others else None

    def __enter__(self) -> _Chain:
        if self.others is not None:
            self.others.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.others is not None:
            self.others.__exit__(*exc)

    def trial(self, limit_bytes: int | None, prompt: list[int] | None, n_generate: int,
              want: list[int] | None, deadline_s: float, base_faults: int = 0) -> tuple[Trial, list[int], list[int]]:
        """Run one trial (see the module docstring). ``prompt`` None: build it from the chain's
        tokenizer. Returns (the trial, the generated tokens, the prompt)."""
        from ..client.chain import Chain, SamplerParams
        from ..errors import ChainError, StageError
        from ..server.local import LocalStages
        from .hostemu import MemoryLimit

        drop_file_cache(self.slices[self.index])
        t0 = time.monotonic()
        tokens: list[int] = []
        with MemoryLimit(limit_bytes) as group:
            stage = LocalStages([self.slices[self.index]], threads=self.threads, ctx=self.ctx,
                                max_sessions=self.max_sessions, cpu_lock=False, preexec=[group.preexec()],
                                start_timeout_s=deadline_s)
            killed = threading.Event()

            def watchdog() -> None:
                # a thrashing stage may take for ever: past the deadline it counts as not fitting
                end = t0 + deadline_s
                while not done.wait(0.5):
                    if time.monotonic() > end:
                        killed.set()
                        for p in stage.procs:
                            if p.poll() is None:
                                p.send_signal(signal.SIGKILL)
                        return

            done = threading.Event()
            dog = threading.Thread(target=watchdog, daemon=True)
            dog.start()
            outcome, detail, steady = "fits", "", 0
            try:
                try:
                    stage.start()
                except ChainError as e:
                    stage.stop()
                    raise _Failed("oom", f"the stage did not start: {str(e).splitlines()[-1][:200]}") from None
                addresses = list(self.others.addresses if self.others else [])
                addresses.insert(self.index, stage.addresses[0])
                with Chain(addresses, timeout_s=max(30.0, deadline_s)) as chain:
                    if prompt is None:
                        prompt = full_context_prompt(chain.tokenize, self.ctx, n_generate)
                    with chain.session(SamplerParams(temp=0.0), ignore_eog=True) as s:
                        tokens.append(s.feed(prompt)["token"])
                        half = n_generate // 2
                        mark = 0
                        for i in range(1, n_generate):
                            if i == half:
                                mark = group.major_faults()
                            tokens.append(s.feed([tokens[-1]])["token"])
                        steady = group.major_faults() - mark
                if want is not None and tokens != want:
                    outcome, detail = "wrong", "tokens differ from the unconstrained run"
                elif want is not None and steady > base_faults + THRASH_FAULTS:
                    outcome, detail = "thrash", f"{steady} major faults over the last {n_generate - n_generate // 2} tokens"
            except _Failed as f:
                outcome, detail = f.outcome, f.detail
            except (StageError, ChainError, OSError) as e:
                outcome, detail = "error", str(e).splitlines()[0][:200]
            finally:
                done.set()
                alive = [p for p in stage.procs if p.poll() is None]
                codes = [p.returncode for p in stage.procs]
                stage.stop()
                oom = group.oom_kills()
                peak = group.max_usage_bytes()
            if outcome in ("error", "oom"):
                if oom or -signal.SIGKILL in codes and not killed.is_set():
                    outcome, detail = "oom", f"OOM-killed ({oom} kill{'s' * (oom != 1)} in the group)"
                elif killed.is_set():
                    outcome, detail = "thrash", f"past the {deadline_s:.0f} s deadline"
                elif not alive and outcome == "error":
                    outcome = "oom" if oom else "error"
        return (Trial(limit_bytes=limit_bytes, outcome=outcome, seconds=round(time.monotonic() - t0, 1),
                      steady_faults=steady, peak_bytes=peak, oom_kills=oom, detail=detail), tokens, prompt or [])


class _Failed(Exception):
    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome, self.detail = outcome, detail


def measure_stage(slices: Sequence[Path], index: int, *, ctx: int = 512, max_sessions: int = 1, threads: int = 0,
                  n_generate: int = 32, resolution_bytes: int = 4 * MIB, log=print) -> StageFootprint:
    """Bisect the footprint of stage ``index`` of the chain ``slices`` (see the module docstring).
    ``log``: called with one line per trial.

    Raises NakError if cgroup v1 memory limits are unavailable (not root, no controller), or if the
    unconstrained run fails or a trial at its peak charge does not fit.
    """
    from ..gguf.memory import predict_stage
    from ..gguf.slicer import read_slice_meta
    from .hostemu import cgroup_memory_missing

    why = cgroup_memory_missing()
    if why:
        raise NakError(f"measuring a footprint {why}")
    path = Path(slices[index])
    meta = read_slice_meta(path)
    start, end = meta.get("nakshatra.layer_range_start"), meta.get("nakshatra.layer_range_end")
    layers = f"{start}-{int(end) - 1}" if start is not None else "all"
    predicted = predict_stage(path, ctx=ctx, max_sessions=max_sessions)
    with _Chain(slices, index, ctx, max_sessions, threads) as chain:
        ref, want, prompt = chain.trial(None, None, n_generate, None, deadline_s=600.0)
        log(f"stage {index} ({path.name}): unconstrained: {ref.outcome}, peak {ref.peak_bytes / MIB:.1f} MiB, "
            f"{ref.steady_faults} steady major faults, {ref.seconds} s")
        if ref.outcome != "fits" or len(want) != n_generate:
            raise NakError(f"stage {index} ({path.name}) fails unconstrained: {ref.outcome} {ref.detail}")
        deadline = max(180.0, 6 * ref.seconds)  # generous: the machine may be shared
        trials = [ref]

        def attempt(limit: int) -> bool:
            t, _, _ = chain.trial(limit, prompt, n_generate, want, deadline, base_faults=ref.steady_faults)
            trials.append(t)
            log(f"  limit {limit / MIB:8.1f} MiB: {t.outcome:6} ({t.seconds} s, peak {t.peak_bytes / MIB:.1f} MiB, "
                f"{t.steady_faults} steady faults){' ' + t.detail if t.detail and t.outcome != 'fits' else ''}")
            return t.outcome == "fits"

        # bracket the footprint between a limit that fails and one that fits, starting from 0.9x
        # and 1.1x the prediction and widening by half until they do: the result does not depend
        # on the prediction (only the number of trials does)
        def round_up(n: float) -> int:
            return -(-int(n) // resolution_bytes) * resolution_bytes

        pred = predicted["total_bytes"]
        hi = round_up(pred * 1.1)
        for _ in range(6):
            if attempt(hi):
                break
            hi = round_up(hi * 1.5)
        else:
            raise NakError(f"stage {index} ({path.name}) does not fit even under {hi / MIB:.0f} MiB "
                           f"({hi / max(ref.peak_bytes, 1):.1f}x its unconstrained peak): see the trials above")
        lo = min(round_up(pred * 0.9), hi - resolution_bytes)
        while lo > 0 and attempt(lo):
            hi, lo = lo, round_up(lo / 1.5) if lo > 2 * resolution_bytes else 0
        while hi - lo > resolution_bytes:
            mid = (lo + hi) // 2 // resolution_bytes * resolution_bytes
            if mid <= lo:
                break
            if attempt(mid):
                hi = mid
            else:
                lo = mid
    return StageFootprint(index=index, slice=str(path), layers=layers, footprint_bytes=hi,
                          unconstrained_peak_bytes=ref.peak_bytes, predicted=predicted, trials=trials)


def measure_model(model: Path, parts: int, *, ctx: int = 512, max_sessions: int = 1, threads: int = 0,
                  n_generate: int = 32, stages: Sequence[int] | None = None, resolution_bytes: int = 4 * MIB,
                  log=print) -> list[StageFootprint]:
    """:func:`measure_stage` for each stage (``stages``: their indices; default all) of ``model``
    cut into ``parts`` (cached slices, as ``nak run --parts``). Raises as :func:`measure_stage`,
    and RangeError / SliceError as :func:`nakshatra.server.local.cached_parts`."""
    from ..server.local import cached_parts

    slices = cached_parts(Path(model), parts, progress=False)
    todo = range(len(slices)) if stages is None else stages
    return [measure_stage(slices, i, ctx=ctx, max_sessions=max_sessions, threads=threads, n_generate=n_generate,
                          resolution_bytes=resolution_bytes, log=log) for i in todo]


def baseline_model() -> Path:
    """A tiny random llama (1 layer, n_embd 64, f32, SmolLM2's tokenizer), written once into
    ``cache_dir()/models/``: a stage whose llama.cpp buffers are a few MiB, so that its measured
    footprint minus its predicted terms is what the process itself costs
    (:data:`nakshatra.gguf.memory.PROCESS_BASELINE_BYTES`)."""
    from ..gguf.models import pull
    from ..gguf.synthetic import write_synthetic
    from ..paths import cache_dir

    path = cache_dir() / "models" / "synthetic-llama-baseline-f32.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(path, "llama", n_layer=1, n_embd=64, n_head=4, n_head_kv=4, n_ff=128,
                        tokenizer_from=pull("smollm2", progress=False), dtype="f32")
    return path


def measure_baseline(*, ctx: int = 512, threads: int = 0, n_generate: int = 32, resolution_bytes: int = MIB,
                     log=print) -> tuple[int, StageFootprint]:
    """The process baseline: the footprint of a one-stage chain of :func:`baseline_model` minus
    what :func:`nakshatra.gguf.memory.predict_stage` predicts for it without a baseline, bytes; and
    that footprint. Raises as :func:`measure_stage`."""
    fp = measure_stage([baseline_model()], 0, ctx=ctx, max_sessions=1, threads=threads, n_generate=n_generate,
                       resolution_bytes=resolution_bytes, log=log)
    llama_terms = fp.predicted["total_bytes"] - fp.predicted["baseline_bytes"]
    return fp.footprint_bytes - llama_terms, fp


def _model_path(name: str) -> Path:
    """A file path, a built-in model name (``nak pull``) or ``synthetic:SIZE`` (e.g.
    ``synthetic:1.5B``, :func:`nakshatra.gguf.synthetic.cached_synthetic_llama`)."""
    if name.startswith("synthetic:"):
        from ..gguf.synthetic import cached_synthetic_llama

        return cached_synthetic_llama(name.split(":", 1)[1])
    if Path(name).is_file():
        return Path(name)
    from ..gguf.models import pull

    return pull(name, progress=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m nakshatra.bench.footprint MODEL [MODEL ...] --parts 3 --ctx 512 [--json FILE]``."""
    ap = argparse.ArgumentParser(prog="python -m nakshatra.bench.footprint", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="GGUF path, built-in name (smollm2, gemma3-270m) or synthetic:1.5B")
    ap.add_argument("--baseline", action="store_true",
                    help="measure the process baseline (a one-layer model's footprint minus its llama.cpp terms)")
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--stages", default="", help="stage indices to measure, e.g. 0,2 (default: all)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-sessions", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-generate", type=int, default=32)
    ap.add_argument("--resolution-mib", type=int, default=4)
    ap.add_argument("--json", default="", help="write every figure and trial here")
    a = ap.parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every MemoryLimit: no group is left behind

    signal.signal(signal.SIGTERM, on_term)
    rows = []
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if a.baseline:
        try:
            base, fp = measure_baseline(ctx=a.ctx, threads=a.threads, n_generate=a.n_generate, log=log)
        except NakError as e:
            print(f"nak footprint: error: {e}", file=sys.stderr)
            return 1
        print(f"process baseline: {base} bytes ({base / MIB:.1f} MiB): footprint {fp.footprint_bytes / MIB:.1f} MiB "
              f"of a one-layer model minus its llama.cpp terms {(fp.predicted['total_bytes'] - fp.predicted['baseline_bytes']) / MIB:.1f} MiB")
        if not a.models:
            return 0
    if not a.models:
        ap.error("give a model, or --baseline")
    try:
        for name in a.models:
            path = _model_path(name)
            stages = [int(x) for x in a.stages.split(",")] if a.stages else None
            for fp in measure_model(path, a.parts, ctx=a.ctx, max_sessions=a.max_sessions, threads=a.threads,
                                    n_generate=a.n_generate, stages=stages, resolution_bytes=a.resolution_mib * MIB,
                                    log=log):
                rows.append((name, fp))
    except (NakError, ValueError) as e:
        print(f"nak footprint: error: {e}", file=sys.stderr)
        return 1
    print(f"{'model':24} {'stage':>5} {'layers':>8} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}")
    for name, fp in rows:
        print(f"{name:24} {fp.index:>5} {fp.layers:>8} {fp.predicted['total_bytes'] / MIB:>14.1f} "
              f"{fp.footprint_bytes / MIB:>13.1f} {fp.ratio:>6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps([{"model": n, **asdict(fp), "ratio": fp.ratio} for n, fp in rows],
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
