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
