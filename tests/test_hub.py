"""hf: and ollama: model references, resolved through the real on-disk layouts that
huggingface_hub and Ollama write, built here around the real cached models (hard links, never
copies). No network: HF_HUB_OFFLINE is set and the caches are temporary directories; where the
online path is exercised, the hub's two calls are replaced by fakes that answer from the layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nakshatra.errors import ModelError
from nakshatra.gguf import hub
from nakshatra.gguf.models import BUILTIN, resolve_model

COMMIT = "a" * 40
COMMIT_V1 = "b" * 40
HOST = "registry.test"  # Ollama's store is read by listing manifests/; the host name is whatever is there


def _link(src: Path, dst: Path) -> None:
    """Hard link ``dst`` to ``src`` (a symlink where a hard link is not possible): no copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        dst.symlink_to(src)


def hf_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
            refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay out ``repo_id`` in a huggingface_hub cache as hf_hub_download leaves it: blobs named by
    their sha256 (a hard link to a real model, or the given bytes), snapshot entries as relative
    symlinks into blobs, refs naming the commit. Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, content in files.items():
        if isinstance(content, Path):
            sha = {p: s.sha256 for p, s in (("smollm2.gguf", BUILTIN["smollm2"]),
                                             ("gemma3-270m.gguf", BUILTIN["gemma3-270m"]))}[content.name]
            blob = repo / "blobs" / sha
            if not blob.exists():
                _link(content, blob)
        else:
            import hashlib

            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
        entry = snap / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


@pytest.fixture
def two_models(hf_cache, smollm2_path, gemma3_path) -> Path:
    return hf_repo(hf_cache, "org/mixed-GGUF", {
        "SmolLM2-135M-Instruct-Q4_1.gguf": smollm2_path,
        "gemma-3-270m-it-Q4_K_M.gguf": gemma3_path,
        "mmproj-F16.gguf": b"GGUF not a model",
        "README.md": b"# a model card\n",
    })


# ---- Hugging Face ----------------------------------------------------------------------------

def test_hf_single_model_resolves_from_the_cache_snapshot(hf_cache, smollm2_path):
    snap = hf_repo(hf_cache, "org/SmolLM2-GGUF", {"smollm2-135m-instruct-q4_1.gguf": smollm2_path,
                                                  "imatrix.gguf": b"GGUF imatrix", "config.json": b"{}"})
    want = snap / "smollm2-135m-instruct-q4_1.gguf"
    for ref in ("hf:org/SmolLM2-GGUF", "hf:org/SmolLM2-GGUF:Q4_1", "hf:org/SmolLM2-GGUF:q4_1",
                "hf:org/SmolLM2-GGUF:smollm2-135m-instruct-q4_1.gguf", f"hf:org/SmolLM2-GGUF@{COMMIT}"):
        got = resolve_model(ref, progress=False)
        assert got == want, ref
        assert got.is_symlink()  # the snapshot entry itself, not the blob it points to
        assert os.path.samefile(got, smollm2_path)


def test_hf_picks_q4_k_m_among_several_and_says_so(two_models, gemma3_path, smollm2_path, capsys):
    got = hub.resolve("hf:org/mixed-GGUF", progress=True)
    assert got == two_models / "gemma-3-270m-it-Q4_K_M.gguf" and os.path.samefile(got, gemma3_path)
    err = capsys.readouterr().err
    assert "using Q4_K_M as llama.cpp does" in err and "hf:org/mixed-GGUF:QUANT" in err
    assert hub.resolve("hf:org/mixed-GGUF:q4_1", progress=False) == two_models / "SmolLM2-135M-Instruct-Q4_1.gguf"
    with pytest.raises(ModelError, match=r"no Q8_0 model in hf:org/mixed-GGUF; its models: "
                       r"SmolLM2-135M-Instruct-Q4_1.gguf, gemma-3-270m-it-Q4_K_M.gguf$"):
        hub.resolve("hf:org/mixed-GGUF:Q8_0", progress=False)
    with pytest.raises(ModelError, match="mmproj-F16.gguf is not a GGUF model in hf:org/mixed-GGUF"):
        hub.resolve("hf:org/mixed-GGUF:mmproj-F16.gguf", progress=False)


def test_hf_ambiguous_without_q4_k_m_lists_the_choices(hf_cache, smollm2_path, gemma3_path):
    hf_repo(hf_cache, "org/two", {"m-Q4_1.gguf": smollm2_path, "m-Q8_0.gguf": gemma3_path})
    with pytest.raises(ModelError) as e:
        resolve_model("hf:org/two", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "hf:org/two has 2 models and no single Q4_K_M" in msg and msg.endswith("m-Q4_1.gguf, m-Q8_0.gguf")


def test_hf_split_model_is_one_model_and_returns_its_first_shard(hf_cache, smollm2_path):
    """Shard contents are tiny made-up bytes: only names and the snapshot layout are checked here."""
    shards = {f"Q4_K_M/Big-Q4_K_M-{i:05d}-of-00003.gguf": b"GGUF shard %d" % i for i in (3, 1, 2)}
    snap = hf_repo(hf_cache, "org/big", {**shards, "Big-Q4_1.gguf": smollm2_path})
    first = snap / "Q4_K_M" / "Big-Q4_K_M-00001-of-00003.gguf"
    for ref in ("hf:org/big", "hf:org/big:Q4_K_M", "hf:org/big:Q4_K_M/Big-Q4_K_M-00002-of-00003.gguf"):
        assert hub.resolve(ref, progress=False) == first, ref
    assert hub.shard_paths(first) == [first.with_name(f"Big-Q4_K_M-{i:05d}-of-00003.gguf") for i in (1, 2, 3)]
    assert hub.resolve("hf:org/big:q4_1", progress=False) == snap / "Big-Q4_1.gguf"
    (snap / "Q4_K_M" / "Big-Q4_K_M-00003-of-00003.gguf").unlink()
    with pytest.raises(ModelError, match="lacks Big-Q4_K_M-00003-of-00003.gguf beside it"):
        hub.shard_paths(first)


def test_hf_revisions(hf_cache, smollm2_path, gemma3_path):
    main = hf_repo(hf_cache, "org/rev", {"m-Q4_1.gguf": smollm2_path})
    v1 = hf_repo(hf_cache, "org/rev", {"m-Q4_K_M.gguf": gemma3_path}, commit=COMMIT_V1, refs=("v1",))
    assert hub.resolve("hf:org/rev", progress=False) == main / "m-Q4_1.gguf"
    assert hub.resolve("hf:org/rev@v1", progress=False) == v1 / "m-Q4_K_M.gguf"
    assert hub.resolve(f"hf:org/rev@{COMMIT_V1}:Q4_K_M", progress=False) == v1 / "m-Q4_K_M.gguf"
    with pytest.raises(ModelError, match="hf:org/rev@v2 is not in the Hugging Face cache"):
        hub.resolve("hf:org/rev@v2", progress=False)


def test_hf_offline_and_not_cached_says_what_to_run(hf_cache):
    with pytest.raises(ModelError) as e:
        resolve_model("hf:org/absent:Q4_K_M", progress=False)
    msg = str(e.value)
    assert f"hf:org/absent:Q4_K_M is not in the Hugging Face cache {hf_cache}" in msg
    assert "HF_HUB_OFFLINE is set" in msg and msg.endswith("run `nak pull hf:org/absent:Q4_K_M` once online")


def test_hf_repo_without_gguf(hf_cache):
    hf_repo(hf_cache, "org/safetensors", {"model.safetensors": b"x", "config.json": b"{}"})
    with pytest.raises(ModelError, match=r"hf:org/safetensors holds no GGUF model \(files: config.json, "
                       r"model.safetensors\); pick a repository with .gguf files"):
        hub.resolve("hf:org/safetensors", progress=False)


@pytest.mark.parametrize("ref", ["hf:", "hf:repo-without-org", "hf:org/repo:", "hf:org/repo@", "hf:a/b/c"])
def test_hf_malformed(ref):
    with pytest.raises(ModelError, match="malformed Hugging Face reference"):
        hub.parse_hf_ref(ref)


def test_quant_tokens():
    files = ["a-Q4_K.gguf", "a-Q4_K_M.gguf", "a-IQ4_XS.gguf", "a.Q8_0.gguf", "UD-Q4_K_XL/a-UD-Q4_K_XL-00001-of-00002.gguf",
             "UD-Q4_K_XL/a-UD-Q4_K_XL-00002-of-00002.gguf", "mmproj-a-f16.gguf", "a.imatrix.gguf", "notes.txt"]
    groups = hub.group_models(files)
    assert [g[0] for g in groups] == ["UD-Q4_K_XL/a-UD-Q4_K_XL-00001-of-00002.gguf", "a-IQ4_XS.gguf", "a-Q4_K.gguf",
                                      "a-Q4_K_M.gguf", "a.Q8_0.gguf"]
    pick = lambda q: hub.choose_model(hub.HfRef("o/r", quant=q), files)[0]  # noqa: E731
    assert pick("Q4_K") == ["a-Q4_K.gguf"] and pick("q4_k_m") == ["a-Q4_K_M.gguf"]
    assert pick("IQ4_XS") == ["a-IQ4_XS.gguf"] and pick("Q8_0") == ["a.Q8_0.gguf"]
    assert len(pick("Q4_K_XL")) == 2
    with pytest.raises(ModelError, match="no Q4_XS model"):
        pick("Q4_XS")


def _model_info(files: list[str]):
    """A stand-in for HfApi.model_info: what the hub says of a repo (its files, its commit)."""
    from types import SimpleNamespace

    def model_info(self, repo_id, revision=None, timeout=None, **kw):
        assert timeout == hub.HUB_TIMEOUT_S
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in files])
    return model_info


def test_hf_online_lists_then_downloads_every_shard(hf_cache, monkeypatch, smollm2_path):
    """The online path with the hub's two calls answered from a cache layout: the file list, then
    one hf_hub_download per shard, into the cache named by the environment at call time."""
    import huggingface_hub

    shards = [f"Big-Q4_K_M-{i:05d}-of-00002.gguf" for i in (1, 2)]
    snap = hf_repo(hf_cache, "org/big", {**{s: b"GGUF" for s in shards}, "Big-Q4_1.gguf": smollm2_path})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read at call time; the library read it at its import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _model_info([*shards, "Big-Q4_1.gguf", "README.md"]))
    calls = []

    def fake_download(repo_id, filename, *, revision=None, cache_dir=None, **kw):
        calls.append((repo_id, filename, revision, Path(cache_dir)))
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub.resolve("hf:org/big@main:Q4_K_M", progress=False) == snap / shards[0]
    assert calls == [("org/big", s, "main", hf_cache) for s in shards]

    def network_down(self, *a, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", network_down)
    calls.clear()
    with pytest.raises(ModelError, match=r"could not reach the hub for hf:org/big \(ConnectionError"):
        hub.hf_remote_files("hf:org/big")
    assert hub.resolve("hf:org/big:q4_1", progress=False) == snap / "Big-Q4_1.gguf"  # from the cache
    assert calls == []
    with pytest.raises(ModelError, match=r"hf:org/other is not in the Hugging Face cache .* and the hub could "
                       r"not be reached \(ConnectionError: Name or service not known\); run `nak pull hf:org/other`"):
        hub.resolve("hf:org/other", progress=False)


def _online(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return huggingface_hub


def test_hf_hub_answers_become_one_line_with_the_fix(hf_cache, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    hh = _online(monkeypatch)

    def answer(err_class, status):
        def model_info(self, repo_id, revision=None, **kw):
            raise err_class(f"{status} Client Error", response=SimpleNamespace(headers={}, request=None,
                                                                               status_code=status))
        monkeypatch.setattr(hh.HfApi, "model_info", model_info)

    cases = [(RepositoryNotFoundError, 404, "no Hugging Face model repository hf:org/x; check the name, or set "
              "HF_TOKEN or run `hf auth login` if it is private or gated"),
             (GatedRepoError, 403, "hf:org/x is gated: accept its terms on its page, then set HF_TOKEN or run "
              "`hf auth login`"),
             (RevisionNotFoundError, 404, "hf:org/x has no revision 'v9'; give a branch, tag or commit that exists"),
             (HfHubHTTPError, 401, "hf:org/x: access denied (HTTP 401); set HF_TOKEN or run `hf auth login` if "
              "it is private or gated")]
    for err_class, status, want in cases:
        answer(err_class, status)
        with pytest.raises(ModelError) as e:
            resolve_model("hf:org/x@v9" if err_class is RevisionNotFoundError else "hf:org/x", progress=False)
        assert str(e.value) == want


def test_hf_remote_files_one_per_shard_with_size_sha256_and_token(hf_cache, monkeypatch):
    """Only the parsing: the hub's answers (file list, commit, path infos) are fakes."""
    from types import SimpleNamespace

    from huggingface_hub import hf_hub_url

    hh = _online(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    shards = [f"Q4_K_M/Big-Q4_K_M-{i:05d}-of-00002.gguf" for i in (1, 2)]
    monkeypatch.setattr(hh.HfApi, "model_info", _model_info([*shards[::-1], "a.md"]))
    asked = []

    def get_paths_info(self, repo_id, paths, revision=None, **kw):
        asked.append((paths, revision))
        return [SimpleNamespace(path=shards[0], size=1000, lfs=SimpleNamespace(sha256="d" * 64)),
                SimpleNamespace(path=shards[1], size=7, lfs=None)]

    monkeypatch.setattr(hh.HfApi, "get_paths_info", get_paths_info)
    got = hub.hf_remote_files("hf:org/big")
    assert asked == [(shards, COMMIT)]
    assert [(f.path, f.url, f.size, f.sha256) for f in got] == [
        (shards[0], hf_hub_url("org/big", shards[0], revision=COMMIT), 1000, "d" * 64),
        (shards[1], hf_hub_url("org/big", shards[1], revision=COMMIT), 7, None)]
    assert all(f.headers["authorization"] == "Bearer hf_not_a_real_token" for f in got)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="remote reads need the hub and HF_HUB_OFFLINE is set"):
        hub.hf_remote_files("hf:org/big")


def test_hf_verify_checks_the_blob_against_its_sha256(two_models, gemma3_path, tmp_path):
    path = hub.resolve("hf:org/mixed-GGUF:Q4_K_M", progress=False, verify=True)
    assert os.path.samefile(path, gemma3_path)
    bad = hf_repo(tmp_path / "other", "org/bad", {"x.gguf": b"GGUF"})
    blob = Path(os.path.realpath(bad / "x.gguf"))
    blob.write_bytes(b"GGUF changed")
    with pytest.raises(ModelError, match="x.gguf has sha256 .* its cache entry says"):
        hub.verify_hf_blob(bad / "x.gguf")


# ---- Ollama -----------------------------------------------------------------------------------

def ollama_store(root: Path, model: Path, sha: str, name: str = "smollm2", tag: str = "latest",
                 namespace: str = "library", host: str = HOST) -> Path:
    """Lay out Ollama's store as `ollama pull` leaves it: a manifest (config, model, template
    and params layers) and the model blob, a hard link to ``model``. Returns the blob path."""
    blob = root / "blobs" / f"sha256-{sha}"
    if not blob.exists():
        _link(model, blob)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{sha}",
               "size": model.stat().st_size},
              {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64, "size": 10},
              {"mediaType": "application/vnd.ollama.image.params", "digest": "sha256:" + "2" * 64, "size": 10}]
    manifest = root / "manifests" / host / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2,
                                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                               "digest": "sha256:" + "3" * 64, "size": 400},
                                    "layers": layers}))
    return blob


@pytest.fixture
def ollama(tmp_path, monkeypatch, smollm2_path) -> Path:
    root = tmp_path / "ollama" / "models"
    ollama_store(root, smollm2_path, BUILTIN["smollm2"].sha256)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def test_ollama_resolves_to_the_blob_in_place(ollama, smollm2_path):
    blob = ollama / "blobs" / f"sha256-{BUILTIN['smollm2'].sha256}"
    for ref in ("ollama:smollm2", "ollama:smollm2:latest", "ollama:library/smollm2",
                f"ollama:{HOST}/library/smollm2:latest"):
        got = resolve_model(ref, progress=False)
        assert got == blob, ref
    assert os.path.samefile(got, smollm2_path)  # the same file: nothing was copied
    assert [p.name for p in (ollama / "blobs").iterdir()] == [blob.name]
    hub.resolve("ollama:smollm2", verify=True)

    from nakshatra.gguf.slicer import model_layout

    assert model_layout(got, sha256="-").n_layer == 30  # the slicer reads the blob as it is


def test_ollama_unknown_name_lists_what_is_there(ollama, gemma3_path):
    ollama_store(ollama, gemma3_path, BUILTIN["gemma3-270m"].sha256, name="gemma3", tag="270m")
    ollama_store(ollama, gemma3_path, BUILTIN["gemma3-270m"].sha256, name="tiny", namespace="someone")
    with pytest.raises(ModelError) as e:
        resolve_model("ollama:llama3.2:1b", progress=False)
    assert str(e.value) == (f"no Ollama model llama3.2:1b in {ollama}; models there: gemma3:270m, smollm2:latest, "
                            "someone/tiny:latest (get it with `ollama pull llama3.2:1b`)")
    assert resolve_model("ollama:gemma3:270m", progress=False).name == f"sha256-{BUILTIN['gemma3-270m'].sha256}"
    assert resolve_model("ollama:someone/tiny", progress=False).name == f"sha256-{BUILTIN['gemma3-270m'].sha256}"


def test_ollama_name_under_two_hosts(ollama, smollm2_path):
    ollama_store(ollama, smollm2_path, BUILTIN["smollm2"].sha256, host="mirror.test")
    with pytest.raises(ModelError, match=f"ollama:smollm2:latest is under several hosts: mirror.test/library/"
                       f"smollm2:latest, {HOST}/library/smollm2:latest"):
        hub.resolve("ollama:smollm2")
    assert hub.resolve("ollama:mirror.test/library/smollm2").parent == ollama / "blobs"
    assert "mirror.test/library/smollm2:latest" in hub.list_ollama_models()


def test_ollama_broken_stores(ollama, tmp_path, monkeypatch):
    blob = ollama / "blobs" / f"sha256-{BUILTIN['smollm2'].sha256}"
    blob.unlink()
    with pytest.raises(ModelError, match=f"Ollama blob {blob} of ollama:smollm2:latest is missing; "
                       "run `ollama pull smollm2:latest`"):
        hub.resolve("ollama:smollm2")
    blob.write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        hub.resolve("ollama:smollm2")
    with pytest.raises(ModelError, match="has sha256 .* not the .* it is named by"):
        hub.verify_ollama_blob(blob)
    manifest = ollama / "manifests" / HOST / "library" / "smollm2" / "latest"
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.adapter",
                                                "digest": "sha256:" + "4" * 64}]}))
    with pytest.raises(ModelError, match="has no model layer"):
        hub.resolve("ollama:smollm2")
    manifest.write_text("{not json")
    with pytest.raises(ModelError, match="cannot read Ollama manifest"):
        hub.resolve("ollama:smollm2")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="OLLAMA_MODELS=.*nowhere is not a directory"):
        hub.resolve("ollama:smollm2")
    monkeypatch.delenv("OLLAMA_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if not Path("/usr/share/ollama/.ollama/models/manifests").is_dir():
        with pytest.raises(ModelError, match="no Ollama models directory .*set OLLAMA_MODELS"):
            hub.resolve("ollama:smollm2")
    (tmp_path / "home" / ".ollama" / "models" / "manifests").mkdir(parents=True)
    assert hub.ollama_models_dir() == tmp_path / "home" / ".ollama" / "models"


@pytest.mark.parametrize("ref,want", [
    ("ollama:smollm2", hub.OllamaRef(None, "library", "smollm2", "latest")),
    ("ollama:llama3.2:1b", hub.OllamaRef(None, "library", "llama3.2", "1b")),
    ("ollama:me/m:q4", hub.OllamaRef(None, "me", "m", "q4")),
    ("ollama:host:5000/me/m", hub.OllamaRef("host:5000", "me", "m", "latest")),
    ("ollama:host:5000/me/m:v2", hub.OllamaRef("host:5000", "me", "m", "v2")),
])
def test_ollama_parse(ref, want):
    assert hub.parse_ollama_ref(ref) == want


@pytest.mark.parametrize("ref", ["ollama:", "ollama:a:", "ollama:a/b/c/d", "ollama:/x"])
def test_ollama_malformed(ref):
    with pytest.raises(ModelError, match="malformed Ollama reference"):
        hub.parse_ollama_ref(ref)


# ---- nak pull ---------------------------------------------------------------------------------

def test_nak_pull_prints_the_resolved_path(two_models, ollama, gemma3_path, smollm2_path):
    from nakshatra_cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["pull", "hf:org/mixed-GGUF:Q4_K_M"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{two_models / 'gemma-3-270m-it-Q4_K_M.gguf'}\n"
    r = runner.invoke(app, ["pull", "--verify", "ollama:smollm2"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{ollama / 'blobs' / ('sha256-' + BUILTIN['smollm2'].sha256)}\n"
    r = runner.invoke(app, ["pull", "smollm2"])  # built-in names as before
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{smollm2_path}\n"


def test_nak_pull_failure_is_one_line(hf_cache):
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "pull", "hf:org/absent"], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, "COLUMNS": "1000"})  # Rich wraps at the terminal's width
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf:org/absent is not in the Hugging Face cache")
    assert "nak pull hf:org/absent" in lines[0]


def test_nak_run_on_an_ollama_blob_in_place(ollama):
    """The whole way: `nak run --model ollama:smollm2` slices the blob where Ollama keeps it and
    answers as the built-in model does."""
    r = subprocess.run([sys.executable, "-m", "nakshatra_cli", "run", "--model", "ollama:smollm2", "--parts", "2",
                        "--threads", "2", "--ctx", "256", "--temp", "0", "-n", "12", "What is the capital of France?"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert [p.name for p in (ollama / "blobs").iterdir()] == [f"sha256-{BUILTIN['smollm2'].sha256}"]
