"""The array clustering step against the dict union-find it replaced, its memory, its errors,
and the Slurm memory derived from the pair count."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline import cluster
from pipeline.build import plan_stages, stage_resources
from pipeline.cluster import EarliestMinhashCluster, cluster_memory, memory_gb, swar_popcount
from pipeline.config import CorpusConfig, SlurmConfig, StageResources
from pipeline.configlib import load_config


def reference_removals(buckets: Path, sigs: Path) -> dict[str, bytes]:
    """The dict union-find version of the step (main before the array version), verbatim in
    its rules: components by union-find, keep min (day, file << 32 | doc), sorted removals."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for path in sorted(buckets.glob("*.dups")):
        pairs = np.fromfile(path, dtype="<u4").reshape(-1, 4).astype(np.int64)
        for a, b in zip((pairs[:, 0] << 32) | pairs[:, 1], (pairs[:, 2] << 32) | pairs[:, 3]):
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(node)
    days = {}

    def day(node: int) -> int:
        f = node >> 32
        if f not in days:
            days[f] = np.fromfile(sigs / "days" / f"{f:05d}.days", dtype="<i4")
        return int(days[f][node & 0xFFFFFFFF])

    removals: dict[int, list[int]] = {}
    for members in groups.values():
        keep = min(members, key=lambda n: (day(n), n))
        for node in members:
            if node != keep:
                removals.setdefault(node >> 32, []).append(node & 0xFFFFFFFF)
    return {f"{f:06d}.remove": np.asarray(sorted(d), dtype="<u4").tobytes()
            for f, d in removals.items()}  # fmt: skip


def run_step(buckets: Path, sigs: Path, out: Path) -> dict[str, bytes]:
    EarliestMinhashCluster(str(buckets), str(sigs), str(out)).run()
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.remove"))}


def plant(tmp_path: Path, rng: random.Random, files: int = 4, docs: int = 300,
          buckets: int = 5) -> tuple[Path, Path]:  # fmt: skip
    """Days (few distinct values: many ties, some undated) and .dups files holding chains,
    stars, pairs repeated across and within buckets, either order, and self pairs."""
    b, s = tmp_path / "b", tmp_path / "s"
    b.mkdir()
    (s / "days").mkdir(parents=True)
    for f in range(files):
        days = [rng.choice([10, 11, 12, 2**31 - 1]) for _ in range(docs)]
        np.asarray(days, dtype="<i4").tofile(s / "days" / f"{f:05d}.days")
    nodes = [(f, d) for f in range(files) for d in range(docs)]
    rng.shuffle(nodes)
    groups, i = [], 0
    while i < len(nodes) * 2 // 3:
        k = rng.choice([2, 2, 3, 5, 8, 20])
        groups.append(nodes[i : i + k])
        i += k
    for bucket in range(buckets):
        for worker in range(2):
            pairs = []
            for g in groups[worker::2]:
                members = sorted(rng.sample(g, rng.randint(min(2, len(g)), len(g))))
                if rng.random() < 0.5:  # a chain, as datatrove writes consecutive equal sigs
                    pairs += [(*x, *y) for x, y in zip(members, members[1:])]
                else:  # a star, pairs written either way round
                    pairs += [(*m, *members[0]) if rng.random() < 0.5 else (*members[0], *m)
                              for m in members[1:]]  # fmt: skip
            pairs += rng.sample(pairs, len(pairs) // 10)  # repeated within the file
            pairs.append((*nodes[-1], *nodes[-1]))  # a document paired with itself
            rng.shuffle(pairs)
            np.asarray(pairs, dtype="<u4").tofile(b / f"{bucket:05d}_{worker:02d}.dups")
    return b, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_bytes_as_the_dict_union_find(tmp_path, monkeypatch, seed):
    b, s = plant(tmp_path, random.Random(seed))
    expected = reference_removals(b, s)
    assert len(expected) == 4 and sum(map(len, expected.values())) > 4 * 100
    assert run_step(b, s, tmp_path / "o") == expected
    # reading in chunks of 7 pairs merges many partial unions: same bytes
    monkeypatch.setattr(cluster, "CHUNK_PAIRS", 7)
    assert run_step(b, s, tmp_path / "o7") == expected
    monkeypatch.setattr(cluster, "popcount", swar_popcount)  # numpy < 2
    assert run_step(b, s, tmp_path / "o-swar") == expected


def test_ties_keep_the_first_in_stream_order_and_a_chain_joins(tmp_path):
    b, s = tmp_path / "b", tmp_path / "s"
    b.mkdir()
    (s / "days").mkdir(parents=True)
    np.asarray([5, 3, 3, 7], dtype="<i4").tofile(s / "days" / "00000.days")
    np.asarray([3, 9], dtype="<i4").tofile(s / "days" / "00002.days")
    # chain (0,0)-(0,3)-(2,0)-(0,2)-(0,1): days 5, 7, 3, 3, 3: (0,1) and (0,2) tie with (2,0)
    # on day 3; the smallest key (0,1) is kept; (2,1) alone with (2,1) itself is no cluster
    np.asarray([(0, 3, 0, 0), (2, 0, 0, 3), (2, 0, 0, 2), (2, 0, 0, 2)], "<u4").tofile(b / "a.dups")
    np.asarray([(0, 1, 0, 2), (2, 1, 2, 1)], "<u4").tofile(b / "b.dups")
    removed = run_step(b, s, tmp_path / "o")
    assert {k: np.frombuffer(v, "<u4").tolist() for k, v in removed.items()} == {
        "000000.remove": [0, 2, 3], "000002.remove": [0],
    }  # fmt: skip
    assert removed == reference_removals(b, s)


def test_empty_and_missing_pairs_write_nothing(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "00000_00.dups").write_bytes(b"")
    assert run_step(tmp_path / "b", tmp_path / "s", tmp_path / "o") == {}


def test_bad_files_are_named(tmp_path):
    b, s = tmp_path / "b", tmp_path / "s"
    b.mkdir()
    (s / "days").mkdir(parents=True)
    (b / "00000_00.dups").write_bytes(b"\0" * 20)
    with pytest.raises(ValueError, match=r"00000_00.dups: 20 bytes is not a whole number of 16"):
        run_step(b, s, tmp_path / "o")
    np.asarray([(0, 0, 1, 5)], "<u4").tofile(b / "00000_00.dups")
    np.asarray([1, 2], dtype="<i4").tofile(s / "days" / "00000.days")
    with pytest.raises(FileNotFoundError, match=r"days/00001.days is missing"):
        run_step(b, s, tmp_path / "o")
    np.asarray([1, 2], dtype="<i4").tofile(s / "days" / "00001.days")
    with pytest.raises(ValueError, match=r"days/00001.days has 2 documents but the .dups files "
                                         r"name document 5"):  # fmt: skip
        run_step(b, s, tmp_path / "o")


def memory_case(tmp_path: Path) -> tuple[Path, Path]:
    """100k documents in 50k clusters of two, each pair found in 8 buckets (400k pairs)."""
    b, s = tmp_path / "b", tmp_path / "s"
    b.mkdir()
    (s / "days").mkdir(parents=True)
    docs = 100_000
    np.random.default_rng(0).integers(1, 100, docs, dtype="<i4").tofile(s / "days" / "00000.days")
    pairs = np.zeros((docs // 2, 4), dtype="<u4")
    pairs[:, 1], pairs[:, 3] = np.arange(0, docs, 2), np.arange(1, docs, 2)
    for bucket in range(8):
        pairs.tofile(b / f"{bucket:05d}_00.dups")
    return b, s


def test_memory_is_arrays_not_objects(tmp_path, monkeypatch):
    """Peak traced memory (numpy's allocations are traced too) per duplicated document: the
    dict version holds several Python objects per node (~200 B here), this one a few arrays
    (chunks small next to the 100k nodes, as they are at scale): ~34 B, where an undirected
    scipy call (its transposed copy, float64 data materialized) and a lexsort of all nodes
    held ~44 B."""
    b, s = memory_case(tmp_path)
    monkeypatch.setattr(cluster, "CHUNK_PAIRS", 8192)
    tracemalloc.start()
    try:
        EarliestMinhashCluster(str(b), str(s), str(tmp_path / "o")).run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / 100_000 < 40  # bytes per node
    assert peak < memory_gb(400_000, 100_000) * 1e9


def test_slurm_memory_follows_the_pair_count(tmp_path, dump):
    sc = SlurmConfig(cpus_per_task=2, stages={"split": StageResources(mem_per_cpu_gb=1)})
    assert stage_resources(sc, "minhash-cluster", 30.0)["mem_per_cpu_gb"] == 15
    assert stage_resources(sc, "minhash-cluster", 3.0)["mem_per_cpu_gb"] == 4  # the default
    assert stage_resources(sc, "split", 30.0)["mem_per_cpu_gb"] == 1  # explicit entry wins
    b, s = tmp_path / "b", tmp_path / "s"
    gb, basis = cluster_memory(str(b), str(s), 15 * 10**9, num_buckets=14, dups_files=2)
    assert basis == "~7e+07 pairs estimated from ~1e+07 documents (input bytes / 1500) x 14 " \
                    "buckets x 0.5"  # fmt: skip
    assert gb == pytest.approx(memory_gb(7 * 10**7, 10**7))
    (s / "days").mkdir(parents=True)
    np.zeros(1000, dtype="<i4").tofile(s / "days" / "00000.days")
    assert cluster_memory(str(b), str(s), 10**12, 14, 2)[1].startswith(
        "~7e+03 pairs estimated from 1e+03 documents x")  # fmt: skip
    b.mkdir()
    (b / "00000_00.dups").write_bytes(b"\0" * 16 * 10**6)
    assert "estimated" in cluster_memory(str(b), str(s), 0, 14, 2)[1]  # one of two files
    (b / "00001_00.dups").write_bytes(b"\0" * 16 * 10**6)
    gb, basis = cluster_memory(str(b), str(s), 0, 14, 2)
    assert basis == "2e+06 pairs in the .dups files among 1e+03 documents"
    assert gb == memory_gb(2 * 10**6, 1000) > memory_gb(10**6, 1000)
    # the planned cluster stage carries the derivation; its input is the dump's bytes
    cfg = load_config(CorpusConfig, None, [f"input=[{dump.root}]", f"output={tmp_path / 'c'}"])
    stage = next(st for st in plan_stages(cfg) if st.name == "minhash-cluster")
    assert "documents (input bytes / 1500)" in stage.memory()[1]


def test_popcount_without_numpy2_counts_bits():
    x = np.random.default_rng(0).integers(0, 2**64, 1000, dtype=np.uint64)
    x[:3] = [0, 2**64 - 1, 2**63]
    expected = [bin(int(v)).count("1") for v in x]
    assert swar_popcount(x).tolist() == expected
