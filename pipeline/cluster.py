"""MinHash stage 3 (clusters of duplicate pairs, earliest-dated member kept) in arrays.

The first version joined the ``.dups`` pairs in a Python dict union-find: ~130 B and ~1.8 us
per pair. At SlimPajama/FineWeb scale (10^8 pairs and more) that is tens of GB and hours in
one process, past the 1 CPU x 4 GB a Slurm stage gets by default. Here the pairs never become
Python objects:

1. every ``.dups`` file is read in chunks of ``CHUNK_PAIRS`` records (datatrove's layout: four
   little-endian uint32, file and document of one copy, then of the other);
2. a document's dense id is its index among all the build's documents (``offsets[file] +
   doc``, from the lengths of the signature stage's ``days/`` files); one pass marks the
   duplicated ones in a bitmap, and their ranks among the marked ones (popcounts and one
   prefix count per 64-bit word) are their compact node ids;
3. a second read maps each pair by two array lookups to ``(low id << 32) | high id``; the
   distinct edges (:class:`SortedUnion` merges each chunk's, so a pair repeated in many
   buckets is held once) form a CSR matrix holding each in both directions (built chunk by
   chunk, see :func:`symmetric_csr`), and ``scipy.sparse.csgraph.connected_components``
   labels its strongly connected components, which on a symmetric graph are the connected
   ones (its undirected call would hold a transposed copy with float64 data);
4. each component keeps its member with the earliest day (``days/`` of the signature stage),
   ties broken by the smallest node key, i.e. the first in stream order -- exactly the rule
   of the dict version, so the ``.remove`` files are byte-identical
   (``tests/pipeline/test_cluster.py`` runs both on planted chains, stars, repeats and ties).

Peak memory is a few arrays over the *distinct* pairs and duplicated documents plus 5 bytes
per document of the build (while the bitmap is built), see :func:`memory_gb`, fitted to
``benchmarks/cluster_scale.py``; never a Python object per pair. Compact ids are int32 (what
scipy's graph routines index with), so one build's clustering handles up to 2^31 - 1 distinct
duplicated documents; past that the step says so instead of overflowing.

The Slurm memory of the stage (one task) is derived from the pair count when it is submitted:
from the sizes of the ``.dups`` files when the buckets stage has already written them (a
resubmission), otherwise from an estimate, documents x ``ASSUMED_PAIRS_PER_DOC_PER_BUCKET`` x
buckets, where the documents are counted from the signature stage's ``days/`` files when they
exist and otherwise estimated as input bytes / ``ASSUMED_DOC_BYTES``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator

import numpy as np
from datatrove.io import DataFolder, get_datafolder
from datatrove.pipeline.base import PipelineStep
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

PAIR = np.dtype([("f1", "<u4"), ("d1", "<u4"), ("f2", "<u4"), ("d2", "<u4")])
"""One record of datatrove's ``.dups`` files (``struct.pack("<4I", file1, doc1, file2, doc2)``)."""
CHUNK_PAIRS = 1 << 16  # 1 MiB of records per read (~8 MB of temporaries)
MIN_MERGE = 1 << 16  # distinct values pending before a merge, at least
MAX_NODES = np.iinfo(np.int32).max
_LOW32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)

# memory model of this step: peak RSS ~ BASE_GB + BYTES_PER_PAIR * pairs + BYTES_PER_DOC *
# documents. benchmarks/cluster_scale.py measured 80 MB after imports and ~4.1 B per pair above
# them at 10^7 pairs (~6.6 pairs and 1 distinct edge per duplicated document, as datatrove's
# buckets repeat pairs); BYTES_PER_PAIR is ~4x that for pair sets with fewer repeats (more
# distinct edges and documents per pair), and SAFETY covers allocator slack
BASE_GB = 0.5
BYTES_PER_PAIR = 16.0
SAFETY = 1.5
BYTES_PER_DOC = 1.2  # the bitmap (1 byte per document while marking, then 0.19)
# used only before any .dups or days/ file exists (a first Slurm submission)
ASSUMED_DOC_BYTES = 1500
"""Stored (compressed) input bytes per document: SlimPajama's .jsonl.zst average, ~1.5 kB."""
ASSUMED_PAIRS_PER_DOC_PER_BUCKET = 0.5
"""A bucket holds at most one pair per document; SlimPajama's near-duplicate share is ~1/2."""


def read_pairs(folder: DataFolder, name: str) -> Iterator[np.ndarray]:
    """The records (dtype ``PAIR``) of one ``.dups`` file, chunk by chunk."""
    size = folder.size(name)
    if size % PAIR.itemsize:
        raise ValueError(f"{folder.path}/{name}: {size} bytes is not a whole number of "
                         f"{PAIR.itemsize}-byte pairs (a truncated write?); delete the "
                         "minhash-buckets stage's folder and rebuild")  # fmt: skip
    with folder.open(name, "rb") as f:
        for start in range(0, size, CHUNK_PAIRS * PAIR.itemsize):
            # never ask for more than is left: a read allocates what it is asked for
            yield np.frombuffer(f.read(min(CHUNK_PAIRS * PAIR.itemsize, size - start)), PAIR)


def _sorted_distinct(values: np.ndarray, kind: str | None = None) -> np.ndarray:
    values.sort(kind=kind)
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


class SortedUnion:
    """The sorted distinct values of every array added, holding about the distinct values.

    Chunks are reduced to their distinct values; once the pending ones outnumber a quarter of
    the merged ones, the new values among them are inserted (peak: about twice the merged
    values; each merge copies them once, so there are O(log n) merges while they grow and one
    per quarter of them when chunks repeat known values).
    """

    def __init__(self, dtype):
        self.merged = np.empty(0, dtype=dtype)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, values: np.ndarray) -> None:
        """Adds ``values`` (sorted in place: pass an array that is not needed in its order)."""
        part = _sorted_distinct(np.asarray(values, dtype=self.merged.dtype))  # numpy's SIMD sort
        self.pending.append(part)
        self.n_pending += len(part)
        if self.n_pending > max(len(self.merged) // 4, MIN_MERGE):
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        # timsort: a concatenation of sorted runs is merged in about linear time
        part = _sorted_distinct(np.concatenate(self.pending), kind="stable")
        self.pending, self.n_pending = [], 0
        if len(self.merged):  # only the new values are inserted: no sort of the merged ones
            at = np.searchsorted(self.merged, part)
            new = at == len(self.merged)
            new[~new] = self.merged[at[~new]] != part[~new]
            part, at = part[new], at[new]
        self.merged = np.insert(self.merged, at, part) if len(self.merged) else part

    def result(self) -> np.ndarray:
        self._merge()
        return self.merged


class DocumentIndex:
    """Dense ids of all the build's documents: document d of signature file f is
    ``offsets[f] + d``, from the lengths of the ``days/`` files (one int32 per document)."""

    def __init__(self, signatures: DataFolder):
        self.folder = signatures
        names = signatures.list_files("days", glob_pattern="*.days") if \
            signatures.exists("days") else []  # fmt: skip
        ranks = [int(n.rsplit("/", 1)[-1].split(".")[0]) for n in names]
        self.counts = np.full(max(ranks, default=-1) + 1, -1, dtype=np.int64)  # -1: no file
        for rank, name in zip(ranks, names):
            self.counts[rank] = signatures.size(name) // 4
        self.offsets = np.r_[0, np.cumsum(np.maximum(self.counts, 0))]
        self.total = int(self.offsets[-1])

    def dense(self, files: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """Dense ids (int64) of documents ``docs`` of signature files ``files``; one outside
        the days files is an error naming the file."""
        if len(files) and (top := int(files.max())) >= len(self.counts):
            self._missing(top)
        counts = self.counts[files]
        if (bad := np.flatnonzero(docs >= counts)).size:
            f, d, n = int(files[bad[0]]), int(docs[bad[0]]), int(counts[bad[0]])
            if n < 0:
                self._missing(f)
            raise ValueError(f"{self.folder.path}/days/{f:05d}.days has {n} documents but the "
                             f".dups files name document {d}: signatures and buckets are out "
                             "of step; delete the minhash stages' folders and rebuild")  # fmt: skip
        del counts
        return self.offsets[files] + docs

    def _missing(self, f: int):
        raise FileNotFoundError(f"{self.folder.path}/days/{f:05d}.days is missing but the .dups "
                                f"files name documents of file {f}; delete the minhash stages' "
                                "folders and rebuild")  # fmt: skip

    def keys(self, dense: np.ndarray) -> np.ndarray:
        """Node keys ``file << 32 | doc`` (uint64) of sorted dense ids, chunk by chunk."""
        out = np.empty(len(dense), dtype=np.uint64)
        for start in range(0, len(dense), CHUNK_PAIRS):
            part = dense[start : start + CHUNK_PAIRS]
            files = np.searchsorted(self.offsets, part, side="right") - 1
            docs = (part - self.offsets[files]).astype(np.uint64)
            out[start : start + len(part)] = (files.astype(np.uint64) << _S32) | docs
        return out


def swar_popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy < 2 has no ``np.bitwise_count``)."""
    m1, m2, m4 = (np.uint64(v) for v in (0x5555555555555555, 0x3333333333333333,
                                         0x0F0F0F0F0F0F0F0F))  # fmt: skip
    x = x - ((x >> np.uint64(1)) & m1)
    x = (x & m2) + ((x >> np.uint64(2)) & m2)
    x = (x + (x >> np.uint64(4))) & m4
    with np.errstate(over="ignore"):  # the high bytes' overflow is meant (mod 2^64)
        return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


popcount = getattr(np, "bitwise_count", swar_popcount)


class BitRank:
    """Rank (int64) of marked positions among all marked ones, from a bitmap and one int32
    prefix count per 64-bit word: 0.19 bytes per position instead of an int32 rank each."""

    def __init__(self, marked: np.ndarray):
        bits = np.packbits(marked, bitorder="little")
        self.words = np.zeros((len(bits) + 7) // 8, dtype="<u8")
        self.words.view(np.uint8)[: len(bits)] = bits
        del bits
        counts = popcount(self.words).astype(np.int32)
        self.before = np.cumsum(counts, dtype=np.int32) - counts  # marked before each word

    def __len__(self) -> int:
        return int(self.before[-1] + popcount(self.words[-1])) if len(self.words) else 0

    def marked(self) -> np.ndarray:
        """The marked positions, sorted (int64)."""
        return np.flatnonzero(np.unpackbits(self.words.view(np.uint8), bitorder="little"))

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        word = positions >> 6
        below = (np.uint64(1) << (positions & 63).astype(np.uint64)) - np.uint64(1)
        return self.before[word] + popcount(self.words[word] & below)


def pair_graph(folder: DataFolder, names: list[str], index: DocumentIndex):
    """(the duplicated documents' dense ids as a :class:`BitRank`, their sorted distinct edges
    ``low id << 32 | high id``); their node keys are only made after clustering (12 bytes per
    node less at the peak).

    A node's compact id is its rank among the duplicated documents' dense ids: one pass marks
    them in a bitmap over all documents, which is then ranked (:class:`BitRank`), and a second
    pass maps each pair by two lookups (no search, no per-node objects).
    """
    present = np.zeros(index.total, dtype=bool)
    for name in names:
        for rec in read_pairs(folder, name):
            present[index.dense(rec["f1"], rec["d1"])] = True
            present[index.dense(rec["f2"], rec["d2"])] = True
    if (n_nodes := int(np.count_nonzero(present))) > MAX_NODES:
        raise ValueError(f"{folder.path}: {n_nodes} distinct duplicated documents, more "
                         f"than the {MAX_NODES} one clustering task handles; raise dedup "
                         "thresholds (more hashes_per_bucket) or dedup the inputs in parts")  # fmt: skip
    rank = BitRank(present)
    del present
    edges = SortedUnion(np.uint64)
    for name in names:
        for rec in read_pairs(folder, name):
            edges.add(_chunk_edges(rec, rank, index))
    return rank, edges.result()


def _chunk_edges(rec: np.ndarray, rank: BitRank, index: DocumentIndex) -> np.ndarray:
    """``low id << 32 | high id`` of one chunk's pairs, a document paired with itself left out
    (a cluster of one); temporaries are freed as soon as used (they add to the merge's peak)."""
    lo = rank(index.dense(rec["f1"], rec["d1"])).astype(np.uint64)
    hi = rank(index.dense(rec["f2"], rec["d2"])).astype(np.uint64)
    swap = lo > hi
    lo[swap], hi[swap] = hi[swap], lo[swap]
    distinct = lo != hi
    lo <<= _S32
    lo |= hi
    del hi, swap
    return lo[distinct]


def symmetric_csr(n_nodes: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the CSR matrix holding each distinct upper edge in both directions,
    int32 where that fits (scipy would copy int64 ones down).

    Both directions let scipy label the components as the strongly connected ones of a
    directed graph (the same partition on a symmetric graph), which works on the matrix as
    given; the undirected call builds a transposed copy with float64 data and materializes
    the data array for it (~24 bytes per edge more at the peak). Rows are filled chunk by
    chunk: held are ``edges``, indptr and the indices."""
    dtype = np.int32 if 2 * len(edges) <= MAX_NODES else np.int64
    indptr = np.zeros(n_nodes + 1, dtype=dtype)
    degree = indptr[1:]
    for lo, hi in _edge_chunks(edges):
        np.add.at(degree, lo, 1)
        np.add.at(degree, hi, 1)
    np.cumsum(degree, out=degree)
    # indptr[r + 1] serves as row r's cursor (its first slot; each write advances it), so that
    # no cursor array is held with the indices; filled, it holds row r's end = row r + 1's start
    indices = np.empty(2 * len(edges), dtype=np.int32)
    cursor = indptr[1:]
    cursor[1:] = indptr[1:-1].copy()  # row r starts where rows < r end
    cursor[0] = 0
    for lo, hi in _edge_chunks(edges):
        _scatter(indices, cursor, lo, hi)
        _scatter(indices, cursor, hi, lo)
    return indptr, indices


def _edge_chunks(edges: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(low ids, high ids) of ``edges``, ``CHUNK_PAIRS`` at a time (intp)."""
    for start in range(0, len(edges), CHUNK_PAIRS):
        part = edges[start : start + CHUNK_PAIRS]
        yield (part >> _S32).astype(np.intp), (part & _LOW32).astype(np.intp)


def _scatter(indices: np.ndarray, cursor: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """Writes ``cols`` into the next free slots of their ``rows`` and advances the cursors."""
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    counts = np.diff(np.r_[starts, len(rows)])
    rank = np.arange(len(rows)) - np.repeat(starts, counts)  # place among its row's entries
    indices[cursor[rows] + rank] = cols
    cursor[rows[starts]] += counts.astype(cursor.dtype)


def component_labels(indptr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Component label (int32) of each compact node id of the symmetric CSR matrix
    (:func:`symmetric_csr`): its strongly connected components, Pearce's algorithm in scipy,
    which needs no transposed copy."""
    n = len(indptr) - 1
    ones = np.broadcast_to(np.float64(1), cols.shape)  # unweighted: no data array is stored
    graph = csr_matrix((ones, cols, indptr), shape=(n, n))
    return connected_components(graph, directed=True, connection="strong")[1]


def node_days(index: DocumentIndex, dense: np.ndarray) -> np.ndarray:
    """The day (int32 ordinal, ``days/{file:05d}.days``) of every node, by its dense id
    (sorted, checked against the days files by :meth:`DocumentIndex.dense`)."""
    days = np.empty(len(dense), dtype=np.int32)
    bounds = np.searchsorted(dense, index.offsets)  # each file's first node
    for f in np.flatnonzero(bounds[1:] > bounds[:-1]):
        start, stop = bounds[f], bounds[f + 1]
        with index.folder.open(f"days/{f:05d}.days", "rb") as fh:
            file_days = np.frombuffer(fh.read(), dtype="<i4")
        days[start:stop] = file_days[dense[start:stop] - index.offsets[f]]
    return days


def earliest_members(labels: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Index of each component's kept node (earliest day, ties: smallest index), by label.

    Two ``minimum.at`` passes (earliest day per label, then smallest index among the nodes on
    it): a few bytes per component and per candidate, where a lexsort of all nodes would hold
    an int64 order and its temporaries."""
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    earliest = np.full(n_labels, np.iinfo(days.dtype).max, dtype=days.dtype)
    np.minimum.at(earliest, labels, days)
    candidates = np.flatnonzero(days == earliest[labels])
    del earliest
    kept = np.full(n_labels, len(labels), dtype=np.int64)
    np.minimum.at(kept, labels[candidates], candidates)
    return kept


def first_members(labels: np.ndarray) -> np.ndarray:
    """Smallest node index of each component, by label (int32 like the labels)."""
    first = np.full(int(labels.max()) + 1 if len(labels) else 0, len(labels), dtype=np.int32)
    np.minimum.at(first, labels, np.arange(len(labels), dtype=np.int32))
    return first


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20
"""Arrays of at least this many bytes are mmapped (and unmapped when freed) while the step runs."""
DYNAMIC_MMAP_MAX = 32 << 20
"""Where glibc's dynamic threshold ends up after freeing large arrays (its 64-bit maximum)."""


@contextlib.contextmanager
def large_arrays_unmapped():
    """Keeps glibc from serving large arrays from its heap while the step runs.

    By default glibc raises its mmap threshold to the size of each mmapped block freed (up to
    32 MiB), so after the first freed array of a few MB, such arrays come from the heap, where
    freed ones stay resident between live ones: ~10 MB of the step's peak RSS at 10^7 pairs
    (``benchmarks/cluster_scale.py``), for ~1.5 s more page faults. On exit the threshold is set
    to where the dynamic one ends up (fixed from then on: glibc has no way back to dynamic);
    elsewhere than glibc nothing changes."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to look in (Windows)
        mallopt = None
    if mallopt is None or not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        yield
        return
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_MAX)


class EarliestMinhashCluster(PipelineStep):
    """MinHash stage 3: joins duplicate pairs into clusters and keeps each one's earliest copy.

    Writes ``{file:06d}.remove`` (sorted stream indices, little-endian uint32) for datatrove's
    ``MinhashDedupFilter``.
    """

    type = "🫂 - DEDUP"
    name = "🎯 MinHash stage 3 (earliest kept)"

    def __init__(self, buckets_folder: str, signatures_folder: str, output_folder: str):
        super().__init__()
        self.buckets = get_datafolder(buckets_folder)
        self.signatures = get_datafolder(signatures_folder)
        self.output = get_datafolder(output_folder)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time(), large_arrays_unmapped():
            names = sorted(self.buckets.list_files(glob_pattern="*.dups"))
            index = DocumentIndex(self.signatures)
            dups, edges = pair_graph(self.buckets, names, index)
            if not len(dups):
                return
            csr = symmetric_csr(len(dups), edges)
            del edges
            labels = component_labels(*csr)
            del csr
            first = first_members(labels)  # smallest key, by label like keep
            dense = dups.marked()
            del dups
            keep = earliest_members(labels, node_days(index, dense))
            self.stat_update("clusters", value=len(keep))
            if by_date := int(np.count_nonzero(keep != first)):
                self.stat_update("kept_by_date", value=by_date)  # stream order keeps another
            del first
            removed = np.ones(len(labels), dtype=bool)
            del labels
            removed[keep] = False
            self._write(index.keys(dense[removed]))

    def _write(self, removed: np.ndarray) -> None:
        """``{file:06d}.remove`` per file with removals: its sorted document indices."""
        if len(removed):
            self.stat_update("to_remove", value=len(removed))
        files = removed >> _S32
        starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]]) if len(removed) else []
        for start, stop in zip(starts, [*starts[1:], len(removed)]):
            docs = (removed[start:stop] & _LOW32).astype("<u4")
            with self.output.open(f"{int(files[start]):06d}.remove", "wb") as f:
                f.write(docs.tobytes())


def count_pairs(buckets: DataFolder, files: int) -> int | None:
    """Pairs in the ``.dups`` files, or None until the buckets stage has written all ``files``."""
    if not buckets.exists(""):
        return None
    names = buckets.list_files(glob_pattern="*.dups")
    return sum(buckets.size(n) for n in names) // PAIR.itemsize if len(names) >= files else None


def count_documents(signatures: DataFolder) -> int | None:
    """Documents the signature stage read (its ``days/`` files), None before it has run."""
    if not signatures.exists("days"):
        return None
    names = signatures.list_files("days", glob_pattern="*.days")
    return sum(signatures.size(n) for n in names) // 4 if names else None


def memory_gb(pairs: int, docs: int) -> float:
    """Peak memory of this step over ``pairs`` pairs among ``docs`` documents (with the
    safety margin), in GB."""
    return (BASE_GB + (BYTES_PER_PAIR * pairs + BYTES_PER_DOC * docs) / 1e9) * SAFETY


def cluster_memory(
    buckets_folder: str, signatures_folder: str, input_bytes: int, num_buckets: int, dups_files: int
) -> tuple[float, str]:
    """(GB the clustering task needs, what it was derived from) at submit time: the pairs of
    the ``dups_files`` ``.dups`` files when all exist, else an estimate (module docstring)."""
    docs = count_documents(get_datafolder(signatures_folder))
    if docs is None:
        docs = math.ceil(input_bytes / ASSUMED_DOC_BYTES)
        doc_basis = f"~{docs:.3g} documents (input bytes / {ASSUMED_DOC_BYTES})"
    else:
        doc_basis = f"{docs:.3g} documents"
    pairs = count_pairs(get_datafolder(buckets_folder), dups_files)
    if pairs is not None:
        basis = f"{pairs:.3g} pairs in the .dups files among {doc_basis}"
    else:
        pairs = math.ceil(docs * num_buckets * ASSUMED_PAIRS_PER_DOC_PER_BUCKET)
        basis = f"~{pairs:.3g} pairs estimated from {doc_basis} x {num_buckets} buckets x " \
                f"{ASSUMED_PAIRS_PER_DOC_PER_BUCKET}"  # fmt: skip
    return memory_gb(pairs, docs), basis
