"""The cluster file (nakshatra.cluster.config): what `nak plan` writes reads back the same, and a bad
file is refused with a message naming the file, the entry and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from nakshatra.cluster.config import ClusterFile, HostSpec, StageSpec, dump_cluster, load_cluster
from nakshatra.errors import NakError
from nakshatra.ranges import LayerRange


@given(cuts=st.lists(st.integers(1, 63), unique=True, max_size=5), n_replicas=st.integers(0, 2))
def test_a_written_cluster_file_reads_back_the_same(tmp_path_factory, cuts: list[int], n_replicas: int) -> None:
    bounds = [0, *sorted(cuts), 64]
    stages = [StageSpec(f"10.0.0.{i + 1}", 7071 + i, LayerRange(a, b), f"m.{a}-{b - 1}.gguf",
                        [f"10.0.1.{i + 1}:{7100 + k}" for k in range(n_replicas)])
              for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    cf = ClusterFile(model="model.gguf", stages=stages, hosts=[HostSpec("pc", "10.0.0.1", 16000, 950.5, 0.5)],
                     key_file="cluster.key", slices_dir="slices", options={"ctx": 2048, "mode": "forwarding"})
    path = tmp_path_factory.mktemp("cf") / "cluster.toml"
    path.write_text(dump_cluster(cf, header="written by a test"))
    back = load_cluster(path)
    assert (back.model, back.stages, back.hosts, back.key_file, back.slices_dir, back.options) == \
        (cf.model, cf.stages, cf.hosts, cf.key_file, cf.slices_dir, cf.options)
    assert back.addresses()[0] == "10.0.0.1:7071" and len(back.addresses()) == len(stages) * (1 + n_replicas)
    assert back.slices_path == path.parent / "slices"


@pytest.mark.parametrize("body, needle", [
    ('[[stages]]\nhost = "a"\nport = 1\nlayers = "0-3"\n', "needs `model"),
    ('model = "m"\n[[stages]]\nhost = "a"\nport = 1\nlayers = "2-3"\n', "starts at layer 2"),
    ('model = "m"\n[[stages]]\nhost = "a"\nport = 1\nlayers = "0-3"\n[[stages]]\nhost = "b"\nport = 1\n'
     'layers = "5-9"\n', "a gap"),
    ('model = "m"\n[[stages]]\nhost = "a"\nport = 1\nlayers = "0-3"\n[[stages]]\nhost = "b"\nport = 1\n'
     'layers = "3-9"\n', "an overlap"),
    ('model = "m"\n[[stages]]\nhost = "a"\nport = 70000\nlayers = "0-3"\n', "port 70000"),
    ('model = "m"\n[[stages]]\nhost = "a"\nlayers = "0-3"\n', "needs host, port and layers"),
    ('model = "m"\n[[stages]]\nhost = "a"\nport = 1\nlayers = "0-3"\nreplicas = ["nocolon"]\n', "host:port"),
    ('model = "m"\n[options]\nmode = "teleport"\n', "options.mode"),
    ('model = "m"\n[[hosts]]\naddress = "a"\n', "needs a name"),
    ('model = "m"\nstages = [\n', "not valid TOML"),
])
def test_a_bad_cluster_file_is_refused_naming_the_fix(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(body)
    with pytest.raises(NakError, match=needle) as e:
        load_cluster(path)
    assert str(path) in str(e.value)


def test_a_missing_cluster_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(NakError, match="nak plan"):
        load_cluster(tmp_path / "nope.toml")


TWO_STAGES = 'model = "smollm2"\n[[stages]]\nhost = "a"\nport = 7071\nlayers = "0-9"\n' \
             '[[stages]]\nhost = "b"\nport = 7072\nlayers = "10-29"\nreplicas = ["c:7072"]\n'


def test_several_models_read_back_and_swap_in(tmp_path: Path) -> None:
    """[[models]]: more models the same stages can serve, one range per stage; `with_model` is the
    cluster serving one of them (same hosts, ports and replicas)."""
    path = tmp_path / "cluster.toml"
    path.write_text(TWO_STAGES + '[[models]]\nname = "gemma"\nmodel = "gemma3-270m"\nlayers = ["0-5", "6-17"]\n'
                    '[[models]]\nmodel = "models/coder.gguf"\nlayers = ["0-11", "12-23"]\n'
                    'slices = ["coder.0-11.gguf", "coder.12-23.gguf"]\n')
    cf = load_cluster(path)
    assert [m.name for m in cf.all_models()] == ["smollm2", "gemma", "coder"]
    assert cf.model_id == "smollm2"
    gemma = cf.with_model("gemma")
    assert gemma.model == "gemma3-270m" and gemma.model_id == "gemma"
    assert [(s.address, s.layers.inclusive(), s.replicas) for s in gemma.stages] == \
        [("a:7071", "0-5", []), ("b:7072", "6-17", ["c:7072"])]
    assert [m.name for m in gemma.all_models()] == ["gemma", "smollm2", "coder"]
    assert [s.slice for s in cf.with_model("coder").stages] == ["coder.0-11.gguf", "coder.12-23.gguf"]
    with pytest.raises(NakError, match="no model named 'llama'; the file has smollm2, gemma, coder"):
        cf.with_model("llama")
    # written back, the same models
    again = tmp_path / "again.toml"
    again.write_text(dump_cluster(cf))
    back = load_cluster(again)
    assert back.all_models() == cf.all_models()


@pytest.mark.parametrize("models, needle", [
    ('[[models]]\nmodel = "g"\nlayers = ["0-5"]\n', r"one inclusive range per \[\[stages\]\] entry \(2\)"),
    ('[[models]]\nlayers = ["0-5", "6-9"]\n', 'needs model = "NAME or PATH"'),
    ('[[models]]\nmodel = "g"\nlayers = ["0-5", "7-9"]\n', "a gap"),
    ('[[models]]\nmodel = "g"\nlayers = ["0-5", "x"]\n', r"\[\[models\]\] #1"),
    ('[[models]]\nmodel = "g"\nlayers = ["0-5", "6-9"]\nslices = ["a.gguf"]\n', "one file per"),
    ('[[models]]\nmodel = "smollm2"\nlayers = ["0-5", "6-29"]\n', "two models are named 'smollm2'"),
])
def test_a_bad_model_entry_is_refused(tmp_path: Path, models: str, needle: str) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(TWO_STAGES + models)
    with pytest.raises(NakError, match=needle):
        load_cluster(path)
