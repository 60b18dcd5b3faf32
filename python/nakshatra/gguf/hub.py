"""Models where people keep them: Hugging Face repositories and Ollama's local store.

Two kinds of reference, accepted wherever a model is (``--model``, ``nak pull``):

``hf:ORG/REPO[@REVISION][:FILE|:QUANT]``
    A Hugging Face model repository, through ``huggingface_hub``: its cache (``HF_HUB_CACHE``,
    else ``$HF_HOME/hub``), its progress bars and its token (``HF_TOKEN`` or ``hf auth login``).
    ``FILE`` is a path in the repo ending in ``.gguf``; ``QUANT`` (``Q4_K_M``, any case) picks the
    one model whose path holds it as a token. Without either, the repo's only model is used; with
    several, ``Q4_K_M`` when there is one (llama.cpp's ``-hf`` default), else an error lists them.
    Split models (llama.cpp's ``NAME-00001-of-00003.gguf``) count as one model: every shard is
    fetched into the same snapshot and the path of the first is returned, as it sits in the
    snapshot directory (a symlink there, not resolved, so that its siblings are found by name).
    ``mmproj*`` and ``*imatrix*`` files are never models. Offline (``HF_HUB_OFFLINE=1``, or the hub
    cannot be reached) the reference resolves from the cached snapshot of the revision.

``ollama:NAME[:TAG]``
    A model pulled with Ollama (``TAG`` defaults to ``latest``; ``NAME`` is ``name``,
    ``namespace/name`` or ``host/namespace/name``; the namespace defaults to ``library``). Its
    manifest (``manifests/<host>/<namespace>/<name>/<tag>``, an OCI/Docker image manifest whose
    layer of media type ``application/vnd.ollama.image.model`` is the GGUF) names a blob
    ``blobs/sha256-<hex>`` that is returned and read in place, never copied. Ollama's models
    directory is ``$OLLAMA_MODELS``, else ``~/.ollama/models``, else
    ``/usr/share/ollama/.ollama/models`` (Linux service installs). Nothing here uses the network.

Formats, from their sources: the Hugging Face cache is huggingface_hub's (``models--ORG--REPO/``
with ``blobs/<sha256 or git sha1>``, ``snapshots/<commit>/<path>`` relative symlinks into blobs,
``refs/<branch or tag>`` holding the commit; see ``hf_hub_download``'s docstring) and is only read
through its own functions (``scan_cache_dir``, ``hf_hub_download``); split names are llama.cpp's
``llama_split_path``; Ollama's store is what ``ollama pull`` writes: a Docker image manifest v2
(JSON) at ``manifests/<host>/<namespace>/<model>/<tag>`` whose layers name content-addressed
blobs ``blobs/sha256-<hex>``.

Every failure is a :class:`~nakshatra.errors.ModelError` whose one line names the file or
reference at fault and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ModelError

HF_PREFIX = "hf:"
OLLAMA_PREFIX = "ollama:"
GGUF_MAGIC = b"GGUF"
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's -hf picks it when a repo has several quantisations

# llama.cpp's split naming (gguf-split, llama_split_path): "%s-%05d-of-%05d.gguf"
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def is_ref(model: str | os.PathLike[str]) -> bool:
    """True if ``model`` (a string or path) is an ``hf:`` or ``ollama:`` reference rather than a
    file path or built-in name."""
    s = os.fspath(model)
    return s.startswith(HF_PREFIX) or s.startswith(OLLAMA_PREFIX)


def resolve(ref: str, progress: bool = True, verify: bool = False) -> Path:
    """The local GGUF path for an ``hf:`` or ``ollama:`` reference (see the module docstring),
    downloading Hugging Face files into huggingface_hub's cache when they are missing and the hub
    can be reached. ``progress`` shows huggingface_hub's byte progress bars and notes (which file
    was picked, that the cache was used) on stderr. ``verify`` also checks the sha256 of the bytes
    on disk against the digest they are stored under (Ollama's blob digest; Hugging Face's LFS
    sha256, the blob's name in its cache): slow, a full read of the model.

    Raises ModelError for a malformed reference, and as described in :func:`resolve_hf` and
    :func:`resolve_ollama`.
    """
    if ref.startswith(HF_PREFIX):
        path = resolve_hf(ref, progress=progress)
        if verify:
            for shard in shard_paths(path):
                verify_hf_blob(shard)
        return path
    if ref.startswith(OLLAMA_PREFIX):
        path = resolve_ollama(ref)
        if verify:
            verify_ollama_blob(path)
        return path
    raise ModelError(f"{ref!r} is not a model reference; use hf:ORG/REPO[:QUANT] or ollama:NAME[:TAG]")


# ---- Hugging Face ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HfRef:
    """A parsed ``hf:ORG/REPO[@REVISION][:FILE|:QUANT]``: ``repo_id``, ``revision`` (None: the
    default branch), ``file`` (a path in the repo ending in .gguf) or ``quant`` (as given)."""

    repo_id: str
    revision: str | None = None
    file: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        s = HF_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")
        return s + (f":{self.file or self.quant}" if (self.file or self.quant) else "")


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_hf_ref(ref: str) -> HfRef:
    """Parse ``hf:ORG/REPO[@REVISION][:FILE|:QUANT]`` (a qualifier ending in ``.gguf`` is a
    file, anything else a quantisation name). Raises ModelError if it is malformed."""
    if not ref.startswith(HF_PREFIX):
        raise ModelError(f"{ref!r} is not a Hugging Face reference; use hf:ORG/REPO[:QUANT]")
    body = ref[len(HF_PREFIX):]
    repo_part, _, qual = body.partition(":")
    repo_id, at, revision = repo_part.partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision) or (":" in body and not qual):
        raise ModelError(f"malformed Hugging Face reference {ref!r}; use hf:ORG/REPO, "
                         "hf:ORG/REPO:Q4_K_M, hf:ORG/REPO:FILE.gguf or hf:ORG/REPO@REVISION:...")
    if qual.lower().endswith(".gguf"):
        return HfRef(repo_id, revision or None, file=qual)
    return HfRef(repo_id, revision or None, quant=qual or None)


def hf_cache_dir() -> Path:
    """huggingface_hub's cache directory, read from the environment at call time (the library
    reads it once, at import): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else its default."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expanduser(home)) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    """True if huggingface_hub is told to stay offline: ``HF_HUB_OFFLINE`` as set at call time
    (``1``, ``ON``, ``YES``, ``TRUE``: offline; any other value: online), else as the library
    read it at import."""
    v = os.environ.get("HF_HUB_OFFLINE")
    if v is not None:
        return v.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and not name.startswith("mmproj") and "imatrix" not in name


def group_models(files: list[str]) -> list[list[str]]:
    """The models among a repo's ``files`` (paths in the repo): each a list of its GGUF files,
    one for a single-file model, every shard in index order for a split one (llama.cpp's
    ``PREFIX-00001-of-0000N.gguf``; all shards of a split share PREFIX and N). mmproj and imatrix
    files are left out. Models are sorted by path."""
    singles: list[list[str]] = []
    splits: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for f in files:
        if not _is_model_file(f):
            continue
        m = _SHARD.match(f)
        if m:
            splits.setdefault((m["prefix"], int(m["count"])), []).append((int(m["index"]), f))
        else:
            singles.append([f])
    groups = singles + [[f for _, f in sorted(v)] for v in splits.values()]
    return sorted(groups, key=lambda g: g[0])


def _describe(group: list[str]) -> str:
    return group[0] if len(group) == 1 else f"{group[0]} (+{len(group) - 1} shards)"


def _quant_matches(path: str, quant: str) -> bool:
    stem = path[:-len(".gguf")] if path.lower().endswith(".gguf") else path
    m = _SHARD.match(path)
    if m:
        stem = m["prefix"]
    return re.search(rf"(?:^|[-._/ ]){re.escape(quant)}(?:$|[-./ ])", stem, re.IGNORECASE) is not None


def choose_model(ref: HfRef, files: list[str]) -> tuple[list[str], str | None]:
    """Pick the model ``ref`` names among a repo's ``files``: its GGUF files (every shard of a
    split model, in order) and a note to show the user when a default was taken (else None).
    Raises ModelError, listing the choices, when the repo has no GGUF model, the file or
    quantisation is not there, or no qualifier was given and the choice is ambiguous."""
    groups = group_models(files)
    if not groups:
        raise ModelError(f"{ref} holds no GGUF model (files: {', '.join(sorted(files)[:8]) or 'none'}"
                         f"{', ...' if len(files) > 8 else ''}); pick a repository with .gguf files")
    choices = ", ".join(_describe(g) for g in groups)
    if ref.file is not None:
        for g in groups:
            if ref.file in g:
                return g, None
        raise ModelError(f"{ref.file} is not a GGUF model in hf:{ref.repo_id}; its models: {choices}")
    if ref.quant is not None:
        hits = [g for g in groups if _quant_matches(g[0], ref.quant)]
        if len(hits) == 1:
            return hits[0], None
        if not hits:
            raise ModelError(f"no {ref.quant} model in hf:{ref.repo_id}; its models: {choices}")
        raise ModelError(f"{ref.quant} matches {len(hits)} models in hf:{ref.repo_id}: "
                         f"{', '.join(_describe(g) for g in hits)}; name one as hf:{ref.repo_id}:FILE.gguf")
    if len(groups) == 1:
        return groups[0], None
    hits = [g for g in groups if _quant_matches(g[0], DEFAULT_QUANT)]
    if len(hits) == 1:
        return hits[0], (f"hf:{ref.repo_id} has {len(groups)} models; using {DEFAULT_QUANT} as llama.cpp "
                         f"does: {_describe(hits[0])} (pick another with hf:{ref.repo_id}:QUANT)")
    raise ModelError(f"hf:{ref.repo_id} has {len(groups)} models and no single {DEFAULT_QUANT}; pick one "
                     f"with hf:{ref.repo_id}:QUANT or hf:{ref.repo_id}:FILE.gguf: {choices}")


def _token_hint() -> str:
    return "set HF_TOKEN or run `hf auth login` if it is private or gated"


HUB_TIMEOUT_S = 10.0  # one request, no retries: an unreachable hub falls back to the cache quickly


def _hub_files(ref: HfRef) -> tuple[list[str], str | None]:
    """The repo's file list and the commit its revision points at, from the hub (one
    ``HfApi.model_info`` request, :data:`HUB_TIMEOUT_S` seconds at most). Raises ModelError for
    answers that mean the reference is wrong (not found, gated, no such revision, other HTTP
    errors); lets any other exception (network down, offline mode) through for the caller to fall
    back to the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, timeout=HUB_TIMEOUT_S)
        return [s.rfilename for s in info.siblings or []], info.sha
    except GatedRepoError:
        raise ModelError(f"hf:{ref.repo_id} is gated: accept its terms on its page, then set HF_TOKEN "
                         "or run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no Hugging Face model repository hf:{ref.repo_id}; check the name, or "
                         f"{_token_hint()}") from None
    except RevisionNotFoundError:
        raise ModelError(f"hf:{ref.repo_id} has no revision {ref.revision!r}; give a branch, tag or "
                         "commit that exists") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelError(f"hf:{ref.repo_id}: access denied (HTTP {status}); {_token_hint()}") from None
        if status is not None and status < 500:
            raise ModelError(f"hf:{ref.repo_id}: the hub answered HTTP {status} "
                             f"({str(e).splitlines()[0]}); check the reference") from None
        raise


def _cached_snapshot(ref: HfRef) -> tuple[Path, list[str]] | None:
    """The cached snapshot directory of ``ref``'s revision (default ``main``; a branch or tag
    through the cache's refs, or a commit hash) and the files in it (paths relative to it), from
    huggingface_hub's cache scan; None if that revision is not cached."""
    from huggingface_hub import scan_cache_dir

    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - CacheNotFound, CorruptedCacheException: nothing usable
        return None
    revision = ref.revision or "main"
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id != ref.repo_id:
            continue
        for rev in repo.revisions:
            if revision in rev.refs or rev.commit_hash == revision:
                snap = Path(rev.snapshot_path)
                return snap, sorted(Path(f.file_path).relative_to(snap).as_posix() for f in rev.files)
    return None


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _note(progress: bool, msg: str) -> None:
    if progress:
        print(f"nak: {msg}", file=sys.stderr)


def resolve_hf(ref: str, progress: bool = True) -> Path:
    """The local path of the model ``ref`` (``hf:ORG/REPO[@REVISION][:FILE|:QUANT]``) names: the
    file, or the first shard of a split model, in huggingface_hub's snapshot directory (not
    resolved through its symlink). Online, the repo's file list comes from the hub and missing
    files are downloaded into the cache (``hf_hub_download``, with byte progress bars on stderr
    when ``progress``); offline (``HF_HUB_OFFLINE``), or when the hub cannot be reached, the
    cached snapshot of the revision is used.

    Raises ModelError (one line, with the fix) for a malformed reference, a repository that is
    not there or is gated (set ``HF_TOKEN`` or ``hf auth login``), a revision that is not there,
    a repo without GGUF models, a file or quantisation not in it (listing those there), an
    ambiguous choice (listing them), a failed download, or an offline reference not in the
    cache (saying what to run online).
    """
    r = parse_hf_ref(ref)
    offline_why: str | None = "HF_HUB_OFFLINE is set" if hf_offline() else None
    files: list[str] | None = None
    if offline_why is None:
        try:
            files, _ = _hub_files(r)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - network down, DNS, offline mode: use the cache
            offline_why = f"the hub could not be reached ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if files is None:
        snap = _cached_snapshot(r)
        if snap is None:
            raise ModelError(f"{r} is not in the Hugging Face cache {hf_cache_dir()} and {offline_why}; "
                             f"run `nak pull {r}` once online")
        snap_dir, cached = snap
        group, note = choose_model(r, cached)
        if note:
            _note(progress, note)
        _note(progress, f"{offline_why}: using the cached snapshot {snap_dir.name[:12]} of hf:{r.repo_id}")
        return snap_dir / group[0]
    group, note = choose_model(r, files)
    if note:
        _note(progress, note)
    return _download_group(r, group, progress)


def cached_hf(ref: str) -> Path | None:
    """The local path of the model ``ref`` names if every file of it (every shard) is already in
    huggingface_hub's cache, else None; never uses the network. Raises ModelError for a malformed
    reference or an ambiguous choice among the cached files."""
    r = parse_hf_ref(ref)
    snap = _cached_snapshot(r)
    if snap is None:
        return None
    snap_dir, cached = snap
    try:
        group, _ = choose_model(r, cached)
    except ModelError:
        return None  # not cached (or not all of it): the hub decides
    paths = [snap_dir / f for f in group]
    if not all(p.is_file() for p in paths):
        return None
    first = paths[0]
    return first if len(shard_paths(first)) == len(group) else None


def _download_group(r: HfRef, group: list[str], progress: bool) -> Path:
    from huggingface_hub import hf_hub_download

    paths = []
    with _progress_bars(progress):
        for i, f in enumerate(group):
            if len(group) > 1:
                _note(progress, f"hf:{r.repo_id}: {f} (shard {i + 1} of {len(group)})")
            try:
                paths.append(Path(hf_hub_download(r.repo_id, f, revision=r.revision,
                                                  cache_dir=hf_cache_dir())))
            except Exception as e:  # noqa: BLE001 - every failure becomes one line with the fix
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ModelError(f"could not download {f} from hf:{r.repo_id} ({msg}); check the network "
                                 "and disk space and run the command again (the download resumes)") from None
    if len({p.parent for p in paths}) != 1:
        raise ModelError(f"the shards of {group[0]} in hf:{r.repo_id} came from different commits "
                         "(the repo changed during the download); run the command again")
    return paths[0]


def shard_paths(first: str | os.PathLike[str]) -> list[Path]:
    """All shards of the split model whose first shard is ``first`` (siblings named by
    llama.cpp's ``PREFIX-%05d-of-%05d.gguf``), or ``[first]`` for a single-file model. Raises
    ModelError if a shard is missing."""
    p = Path(first)
    m = _SHARD.match(p.name)
    if not m:
        return [p]
    n = int(m["count"])
    width = len(m["count"])
    out = [p.with_name(f"{m['prefix']}-{i:0{width}d}-of-{m['count']}.gguf") for i in range(1, n + 1)]
    missing = [q.name for q in out if not q.is_file()]
    if missing:
        raise ModelError(f"split model {p} lacks {', '.join(missing)} beside it; fetch every shard")
    return out


def verify_hf_blob(path: str | os.PathLike[str]) -> None:
    """Check a file in a Hugging Face cache snapshot against its blob's name, which is the LFS
    sha256 for large files (a 64-hex name; a 40-hex git blob id is not checked). Reads the whole
    file. Raises ModelError on a mismatch, naming the file and how to fetch it again."""
    p = Path(path)
    blob = Path(os.path.realpath(p)).name
    if not re.fullmatch(r"[0-9a-f]{64}", blob):
        return
    got = _sha256(p)
    if got != blob:
        raise ModelError(f"{p} has sha256 {got}, its cache entry says {blob}; delete it and pull again "
                         "(`hf cache delete`, or remove the blob)")


# ---- remote files for range reads ------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    """One GGUF file (or shard) on the hub, for HTTP range reads: ``url`` (pinned to a commit),
    ``headers`` (huggingface_hub's, with the token when one is set), ``size`` in bytes, and the
    LFS ``sha256`` (hex) when the hub reports one, else None."""

    path: str
    url: str
    headers: dict[str, str]
    size: int
    sha256: str | None


def hf_remote_files(ref: str) -> list[RemoteFile]:
    """The hub files of the model ``ref`` names, one per shard in order, pinned to the commit the
    revision points at now (from ``HfApi.model_info``), with sizes and LFS sha256 from
    ``HfApi.get_paths_info``. Needs the network. Raises ModelError as :func:`resolve_hf` does for
    a wrong reference, and for a hub that cannot be reached."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    r = parse_hf_ref(ref)
    if hf_offline():
        raise ModelError(f"{r}: remote reads need the hub and HF_HUB_OFFLINE is set; unset it, or "
                         f"`nak pull {r}` while online and use the local file")
    files, sha = _hub_files_or_fail(r)
    group, _ = choose_model(r, files)
    commit = sha or r.revision
    try:
        infos = {i.path: i for i in HfApi().get_paths_info(r.repo_id, group, revision=commit)}
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"could not read file sizes of {r} from the hub ({e}); check the network") from None
    headers = build_hf_headers()
    out = []
    for f in group:
        info = infos.get(f)
        if info is None or getattr(info, "size", None) is None:
            raise ModelError(f"the hub gave no size for {f} in hf:{r.repo_id}; try again")
        lfs = getattr(info, "lfs", None)
        out.append(RemoteFile(path=f, url=hf_hub_url(r.repo_id, f, revision=commit), headers=dict(headers),
                              size=int(info.size), sha256=getattr(lfs, "sha256", None) if lfs else None))
    return out


def _hub_files_or_fail(r: HfRef) -> tuple[list[str], str | None]:
    try:
        return _hub_files(r)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"could not reach the hub for {r} ({type(e).__name__}: {e}); check the network") from None


# ---- Ollama -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OllamaRef:
    """A parsed ``ollama:NAME[:TAG]``: ``host`` (None: any found under ``manifests/``),
    ``namespace`` (default ``library``), ``name`` and ``tag`` (default ``latest``)."""

    host: str | None
    namespace: str
    name: str
    tag: str

    def __str__(self) -> str:
        parts = [p for p in (self.host, None if self.namespace == "library" and not self.host else self.namespace,
                             self.name) if p]
        return f"{'/'.join(parts)}:{self.tag}"


def parse_ollama_ref(ref: str) -> OllamaRef:
    """Parse ``ollama:NAME[:TAG]`` where NAME is ``name``, ``namespace/name`` or
    ``host/namespace/name`` (a host may carry ``:port``). Raises ModelError if malformed."""
    if not ref.startswith(OLLAMA_PREFIX):
        raise ModelError(f"{ref!r} is not an Ollama reference; use ollama:NAME[:TAG]")
    body = ref[len(OLLAMA_PREFIX):]
    name_part, tag = body, "latest"
    head, sep, tail = body.rpartition(":")
    if sep and "/" not in tail:
        name_part, tag = head, tail
    parts = name_part.split("/")
    ok = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    if not tag or not ok.match(tag) or not 1 <= len(parts) <= 3 or not all(ok.match(p) for p in parts[-2:]) \
            or (len(parts) == 3 and not re.match(r"^[A-Za-z0-9.\-]+(:\d+)?$", parts[0])):
        raise ModelError(f"malformed Ollama reference {ref!r}; use ollama:NAME[:TAG], e.g. ollama:llama3.2:1b")
    if len(parts) == 3:
        return OllamaRef(parts[0], parts[1], parts[2], tag)
    if len(parts) == 2:
        return OllamaRef(None, parts[0], parts[1], tag)
    return OllamaRef(None, "library", parts[0], tag)


def ollama_models_dir() -> Path:
    """Ollama's models directory: ``$OLLAMA_MODELS`` if set, else the first of
    ``~/.ollama/models`` and ``/usr/share/ollama/.ollama/models`` that exists. Raises ModelError
    if none does."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        d = Path(os.path.expanduser(env))
        if not d.is_dir():
            raise ModelError(f"OLLAMA_MODELS={env} is not a directory; point it at Ollama's models "
                             "directory (the one holding manifests/ and blobs/)")
        return d
    candidates = [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    for d in candidates:
        if (d / "manifests").is_dir():
            return d
    raise ModelError(f"no Ollama models directory ({' or '.join(map(str, candidates))}); pull the model "
                     "with `ollama pull NAME`, or set OLLAMA_MODELS to where Ollama keeps its models")


def list_ollama_models(models_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The models in Ollama's store as ``NAME:TAG`` (``name`` for the ``library`` namespace,
    ``namespace/name`` otherwise, prefixed with the host where the same name is under several
    hosts), sorted. ``models_dir`` defaults to :func:`ollama_models_dir`."""
    root = Path(models_dir) if models_dir is not None else ollama_models_dir()
    found = []
    mani = root / "manifests"
    for tag in sorted(mani.glob("*/*/*/*")) if mani.is_dir() else []:
        if tag.is_file():
            host, ns, name = tag.parts[-4:-1]
            found.append((host, ns, name, tag.name))
    short = [((n if ns == "library" else f"{ns}/{n}"), t) for _, ns, n, t in found]
    out = []
    for (host, ns, name, t), s in zip(found, short):
        out.append(f"{host}/{ns}/{name}:{t}" if short.count(s) > 1 else f"{s[0]}:{t}")
    return sorted(out)


def resolve_ollama(ref: str) -> Path:
    """The blob ``<models>/blobs/sha256-<hex>`` holding the GGUF of Ollama model ``ref``
    (``ollama:NAME[:TAG]``), read from its manifest; the blob is used in place (not copied,
    not hashed: see :func:`verify_ollama_blob`). No network.

    Raises ModelError for a malformed reference, no Ollama models directory (set
    ``OLLAMA_MODELS``), no such model (listing those there), a name under several hosts (listing
    them), an unreadable manifest or one without a model layer, a missing blob (``ollama pull``),
    or a blob that is not a GGUF.
    """
    r = parse_ollama_ref(ref)
    root = ollama_models_dir()
    mani = root / "manifests"
    hosts = [r.host] if r.host else sorted(h.name for h in mani.iterdir() if h.is_dir()) if mani.is_dir() else []
    hits = [mani / h / r.namespace / r.name / r.tag for h in hosts]
    hits = [p for p in hits if p.is_file()]
    if not hits:
        there = list_ollama_models(root)
        raise ModelError(f"no Ollama model {r} in {root}; models there: {', '.join(there) or 'none'} "
                         f"(get it with `ollama pull {r}`)")
    if len(hits) > 1:
        names = ", ".join(f"{p.parts[-4]}/{r.namespace}/{r.name}:{r.tag}" for p in hits)
        raise ModelError(f"ollama:{r} is under several hosts: {names}; name one as ollama:HOST/NAMESPACE/NAME:TAG")
    manifest = hits[0]
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        layers = doc.get("layers") or []
        digest = next((lay.get("digest") for lay in layers if isinstance(lay, dict)
                       and lay.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE), None)
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"cannot read Ollama manifest {manifest} ({e}); pull it again with "
                         f"`ollama pull {r}`") from None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ModelError(f"Ollama manifest {manifest} has no model layer ({OLLAMA_MODEL_MEDIA_TYPE} with a "
                         f"sha256 digest); it is not a GGUF model Nakshatra can run")
    blob = root / "blobs" / digest.replace(":", "-", 1)
    try:
        with open(blob, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ModelError(f"Ollama blob {blob} of ollama:{r} is missing; run `ollama pull {r}`") from None
    except OSError as e:
        raise ModelError(f"cannot read Ollama blob {blob} ({e.strerror}); check its permissions "
                         "(a service install keeps it under the ollama user)") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"Ollama blob {blob} of ollama:{r} is not a GGUF file; run `ollama pull {r}` again")
    return blob


def verify_ollama_blob(blob: str | os.PathLike[str]) -> None:
    """Check Ollama blob ``blob`` (named ``sha256-<hex>``) against its name: reads all of it.
    Raises ModelError on a mismatch, saying to pull it again."""
    p = Path(blob)
    want = p.name.removeprefix("sha256-")
    got = _sha256(p)
    if got != want:
        raise ModelError(f"Ollama blob {p} has sha256 {got}, not the {want} it is named by; delete it "
                         "and run `ollama pull` again")


def _sha256(path: Path) -> str:
    from .manifest import sha256_file

    return sha256_file(path)
