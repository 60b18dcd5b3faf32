"""A live stage answers malformed, truncated, oversize and out-of-order input with an error for
that connection (or that request) and keeps serving everybody else."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from frames import ERROR, FORWARD, HELLO, OPEN, frame, read_frame
from nakshatra import _nakshatra
from nakshatra.client.chain import Chain, SamplerParams
from nakshatra.errors import ChainError, StageError
from nakshatra.gguf.slicer import slice_model
from nakshatra.ranges import LayerRange
from nakshatra.server.local import LocalStages


def hello_payload(want_model: bytes = b"") -> bytes:
    return (struct.pack("<Q", 1) + bytes(32) + struct.pack("<I", 4) + b"test"
            + struct.pack("<I", len(want_model)) + want_model)


def error_code(payload: bytes) -> int:
    return struct.unpack_from("<H", payload)[0]


@pytest.fixture(scope="module")
def two_stage(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("proto")
    m = slice_model(smollm2_path, ranges=[LayerRange(0, 15), LayerRange(15, 30)], out_dir=out, progress=False)
    with LocalStages([out / s.file for s in m.slices], threads=2, ctx=256, max_sessions=4) as stages:
        yield stages


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def well_behaved(addresses) -> list[int]:
    with Chain(addresses) as c:
        return [t for t, _ in c.generate_tokens(c.tokenize("Hello there"), 8, SamplerParams(temp=0))]


@pytest.mark.parametrize("bad", ["version", "magic", "random", "oversize", "not_hello"])
def test_bad_frames_get_an_error_and_the_stage_keeps_serving(two_stage, bad: str) -> None:
    before = well_behaved(two_stage.addresses)
    s = connect(two_stage.addresses[0])
    with Chain(two_stage.addresses) as c:  # a session open at the same time
        sess = c.session(SamplerParams(temp=0))
        r = sess.feed(c.tokenize("Hello there"))
        data = {
            "version": frame(HELLO, hello_payload(), version=99),
            "magic": frame(HELLO, hello_payload(), magic=0xDEADBEEF),
            "random": os.urandom(4096),
            "oversize": frame(HELLO, b"", length=(1 << 31)),
            "not_hello": frame(FORWARD, b"\0" * 16),
        }[bad]
        s.sendall(data)
        t, payload = read_frame(s)
        assert t == ERROR
        want = {"version": 7, "magic": 1, "random": 1, "oversize": 8, "not_hello": 1}[bad]
        assert error_code(payload) == want
        # the stage closes a stream it cannot resynchronise
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()
        # the concurrent session goes on
        r2 = sess.feed([r["token"]])
        assert r2["token"] >= 0
        sess.close()
    assert well_behaved(two_stage.addresses) == before


def test_truncated_frame_then_disconnect(two_stage) -> None:
    s = connect(two_stage.addresses[1])
    s.sendall(frame(HELLO, hello_payload())[:20])
    s.close()
    s = connect(two_stage.addresses[1])
    s.sendall(frame(HELLO, hello_payload(), length=200) + b"x" * 10)  # promises more than it sends
    s.close()
    assert len(well_behaved(two_stage.addresses)) == 8


def test_malformed_payload_is_a_request_error_not_a_dropped_connection(two_stage) -> None:
    s = connect(two_stage.addresses[0])
    s.sendall(frame(HELLO, hello_payload()))
    t, _ = read_frame(s)
    assert t == 2  # HELLO_OK
    s.sendall(frame(OPEN, b"\x01\x02", session=5))  # short OPEN payload
    t, payload = read_frame(s)
    assert t == ERROR and error_code(payload) == 1
    s.sendall(frame(HELLO, hello_payload()))  # the same connection still works
    t, _ = read_frame(s)
    assert t == 2
    s.close()


def test_request_errors_name_the_problem(two_stage) -> None:
    host, port = two_stage.addresses[0].rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port))
    c.hello()
    with pytest.raises(StageError, match="no open session"):
        c.forward(77, 0, [0], tokens=[1])
    c.open(77, temp=0.0)
    with pytest.raises(StageError, match="outside the vocabulary"):
        c.forward(77, 0, [0], tokens=[10**9])
    with pytest.raises(StageError, match="does not continue"):
        c.forward(77, 0, [5], tokens=[1])
    with pytest.raises(StageError, match="out of order"):
        c.forward(77, 3, [0], tokens=[1])
    with pytest.raises(StageError, match="takes token ids"):
        c.forward(77, 0, [0], embd=b"\0" * 576 * 4)
    with pytest.raises(StageError) as e:
        c.forward(77, 0, list(range(300)), tokens=[1] * 300)
    assert e.value.code == "ctx_full"
    r = c.forward(77, 0, [0, 1], tokens=[1, 2])
    assert r["n_past"] == 2 and len(r["embd"]) == 2 * 576 * 4
    with pytest.raises(StageError, match="already open"):
        c.open(77)
    c.close_session(77)
    c.close()


def test_overloaded_when_sessions_run_out(two_stage) -> None:
    host, port = two_stage.addresses[1].rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port))
    c.hello()
    for sid in range(1, 5):
        c.open(sid)
    with pytest.raises(StageError) as e:
        c.open(99)
    assert e.value.code == "overloaded"
    c.close()  # frees all four


def test_chain_validation_names_the_stage(two_stage, gemma3_path: Path, tmp_path: Path) -> None:
    a, b = two_stage.addresses
    with pytest.raises(ChainError, match="no stage serves layers 15-29"):
        Chain([a])
    with pytest.raises(ChainError, match="no stage serves layers 0-14"):
        Chain([b])
    with pytest.raises(ChainError, match="listed twice"):
        Chain([a, a, b])
    with pytest.raises(ChainError, match="is not usable"):
        Chain([a, "127.0.0.1:1"])
    m = slice_model(gemma3_path, ranges=[LayerRange(0, 9), LayerRange(9, 18)], out_dir=tmp_path, progress=False)
    with LocalStages([tmp_path / m.slices[1].file], threads=1, ctx=64, max_sessions=1) as g:
        with pytest.raises(ChainError, match="another model"):
            Chain([a, g.addresses[0]])


def test_hello_for_another_model_is_refused(two_stage) -> None:
    s = connect(two_stage.addresses[0])
    s.sendall(frame(HELLO, hello_payload(b"f" * 64)))
    t, payload = read_frame(s)
    assert t == ERROR and error_code(payload) == 2  # wrong_model
    s.close()
    host, port = two_stage.addresses[0].rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port))
    sha = c.hello()["model_sha256"]
    assert c.hello(want_model_sha256=sha)["model_sha256"] == sha
    c.close()


def test_stop_tokens_end_generation(two_stage) -> None:
    with Chain(two_stage.addresses) as c:
        prompt = c.tokenize("The capital of France is")
        free = [t for t, _ in c.generate_tokens(prompt, 12, SamplerParams(temp=0))]
        assert len(free) == 12
        stop_at = free[5]
        first = free.index(stop_at)
        got = [t for t, _ in c.generate_tokens(prompt, 12, SamplerParams(temp=0), stop_tokens=[stop_at])]
    assert got == free[:first]


def test_generation_stops_at_a_full_context_and_a_long_prompt_is_refused(two_stage) -> None:
    with Chain(two_stage.addresses) as c:  # the stages hold 256 positions per session
        prompt = c.tokenize("Count: one two three four five six seven eight nine ten") * 20  # 240 tokens
        got = [t for t, _ in c.generate_tokens(prompt, -1, SamplerParams(temp=0.0))]
        assert len(prompt) + len(got) == 257  # 256 positions fed, and the last token sampled
        with pytest.raises(ChainError, match="larger --ctx"):
            list(c.generate_tokens(prompt * 40, 4, SamplerParams(temp=0)))
    with Chain(two_stage.addresses, ring=True) as c:  # the ring stops at the same place by itself
        ring = [t for t, _ in c.generate_tokens(prompt, -1, SamplerParams(temp=0.0))]
    assert ring == got


def _intruder_is_refused(address: str, owner, key: bytes = b"") -> None:
    """Another connection (with the cluster key, when there is one) cannot close, truncate, reopen
    or write into a session ``owner`` opened; the session is untouched afterwards."""
    host, port = address.rsplit(":", 1)
    other = _nakshatra.StageClient(host, int(port), key=key)
    other.hello()
    for what, call in [("close", lambda: other.close_session(77)),
                       ("truncate", lambda: other.truncate(77, 0)),
                       ("reopen", lambda: other.open(77, temp=0.0, reuse=True)),
                       ("forward", lambda: other.forward(77, 0, [0], tokens=[1])),
                       ("forward", lambda: other.forward(77, 0, [0], tokens=[1], sample=False))]:
        with pytest.raises(StageError) as e:
            call()
        assert e.value.code == "unauthorized", (what, e.value)
        assert "another connection" in str(e.value), (what, e.value)
    # a forwarded step with a wrong token, as a stage on the route would send it
    other.send_forward(77, 0, [0], [1], False, "", "", 12345)
    with pytest.raises(StageError, match="does not carry its token") as e:
        _nakshatra.wait_forward_ok([other], 10_000, other.last_request_id)
    assert e.value.code == "unauthorized"
    other.close()
    r = owner.forward(77, 0, [0, 1], tokens=[1, 2])  # still at position 0, step 0
    assert r["n_past"] == 2


def test_only_the_opening_connection_uses_a_session(two_stage) -> None:
    host, port = two_stage.addresses[0].rsplit(":", 1)
    owner = _nakshatra.StageClient(host, int(port))
    owner.hello()
    owner.open(77, temp=0.0, token=0xDEADBEEF)
    _intruder_is_refused(two_stage.addresses[0], owner)
    owner.close_session(77)
    owner.close()


def test_a_stage_without_a_key_forwards_only_to_loopback(two_stage) -> None:
    host, port = two_stage.addresses[0].rsplit(":", 1)
    c = _nakshatra.StageClient(host, int(port))
    c.hello()
    c.open(78, temp=0.0, token=7)
    c.send_forward(78, 0, [0], [1], False, "192.0.2.1:7072", "", 7)  # TEST-NET-1: never dialed
    with pytest.raises(StageError, match="dials only loopback addresses.*--key-file.*--insecure") as e:
        _nakshatra.wait_forward_ok([c], 10_000, c.last_request_id)
    assert e.value.code == "unauthorized"
    c.close()
