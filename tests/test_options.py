"""A stage's options and the sampler's defaults have one definition each (issue 15, point 4):
ServeOptions (python/nakshatra/server/options.py) over the C++ structs' defaults
(nak_stage_params, nak_sampler_params). Every other layer must agree with it: nak serve,
python -m nakshatra.server.serve, a cluster file's [options], the C++ Stage's keyword arguments,
nak run's sampler options.

No model is loaded: a Stage given a parameter it does not have fails before loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import subprocess
import sys

import pytest

from nakshatra import _nakshatra
from nakshatra.client.chain import SamplerParams
from nakshatra.cluster.up import SERVE_FLAGS
from nakshatra.server.options import (
    DEFAULTS,
    FLASH_ATTN,
    add_arguments,
    cluster_flags,
    from_namespace,
    option_fields,
    stage_kwargs,
)


def _float32(x: float) -> float:
    import numpy as np

    return float(np.float32(x))


def test_engine_defaults_come_from_the_cpp_struct():
    cpp = _nakshatra.StageParams()
    kw = stage_kwargs(DEFAULTS)
    assert kw, "no ServeOptions field sets a StageParams field"
    for name, value in kw.items():
        want = getattr(cpp, name)
        assert value == want, f"ServeOptions default of StageParams.{name}: {value!r}, the C++ stage's: {want!r}"
    assert FLASH_ATTN[DEFAULTS.flash_attn] == cpp.flash_attn


def test_sampler_defaults_come_from_the_cpp_struct():
    cpp = _nakshatra.SamplerParams()
    py = SamplerParams()
    for f in dataclasses.fields(SamplerParams):
        if f.name == "seed":
            continue  # None: random, which the wire carries as cpp.seed
        got, want = getattr(py, f.name), getattr(cpp, f.name)
        assert (_float32(got) == want) if isinstance(want, float) else got == want, f.name
    assert cpp.seed == 0xFFFFFFFF


def test_argparse_has_every_option_with_its_default():
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert from_namespace(ap.parse_args(["m.gguf"])) == dataclasses.replace(DEFAULTS, model="m.gguf")
    opts = from_namespace(ap.parse_args(["m.gguf", "--ctx", "512", "-l", "0-3", "--no-verify", "--fetch", "u1",
                                         "--fetch", "u2", "--no-announce", "--cpu-strict", "1", "-fa", "on"]))
    assert (opts.ctx, opts.layers, opts.verify, opts.fetch, opts.announce) == (512, "0-3", False, ("u1", "u2"), False)
    assert stage_kwargs(opts)["flash_attn"] == 1 and stage_kwargs(opts)["cpu_strict"] is True


def test_nak_serve_help_lists_every_option():
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "serve", "--help"], capture_output=True, text=True,
                       env={"COLUMNS": "300", "PATH": ""}, timeout=60)
    assert r.returncode == 0, r.stderr
    for f in option_fields():
        for flag in (*f.metadata["flags"], f.metadata["negative"]):
            if flag:
                assert flag in r.stdout, f"nak serve --help lacks {flag} ({f.name})"
    assert f"[default: {DEFAULTS.ctx}]" in r.stdout


def test_cluster_options_are_the_stage_flags():
    assert SERVE_FLAGS == cluster_flags()
    flags = {f.metadata["flags"][0] for f in option_fields() if f.metadata["flags"]}
    assert set(SERVE_FLAGS.values()) <= flags
    assert SERVE_FLAGS["idle_timeout"] == "--idle-timeout" and "ctx" in SERVE_FLAGS


def test_a_stage_refuses_a_parameter_it_does_not_have():
    with pytest.raises(TypeError, match="unknown stage parameter 'n_ctxx'"):
        _nakshatra.Stage("/nonexistent.gguf", n_ctxx=5)
    with pytest.raises(TypeError, match="stage parameter 'n_ctx' cannot be -5"):
        _nakshatra.Stage("/nonexistent.gguf", n_ctx=-5)
    with pytest.raises(TypeError, match="unknown stage parameter"):
        _nakshatra.estimate_memory("/nonexistent.gguf", ctx=5)


def test_nak_run_sampler_options_default_to_the_sampler():
    from nakshatra_cli import cmd_run

    params = inspect.signature(cmd_run.run).parameters
    for name in ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n"):
        d = params[name].default
        assert math.isclose(d, getattr(SamplerParams(), name)), name
