"""Hashed word n-grams of normalised text, and evaluation tasks as text: what contamination
checks (``maskscale corpus overlap``) and ``decontaminate:`` compare.

**What an n-gram is over.** Words of normalised text, not tokenizer ids: the text is
lowercased and every run of word characters (``\\w+``, Unicode-aware) is a word, so punctuation
and whitespace differences disappear. This is what the GPT-3 and Llama contamination studies
use, and it is the only unit that makes sense across the three things compared: train and
holdout documents (whose BPE ids depend on the corpus's tokenizer) and benchmark items (which
are not tokenized by it, and whose BPE ids would differ with a leading space or a line break
where the web copy has another). A 13-gram of words is long enough that sharing one is
almost never chance (the usual choice; ``--ngram`` changes it), short enough to catch a
quoted sentence. Documents and items shorter than one n-gram have none and can never match
(counted as ``too_short``).

**Hashes.** Each word is hashed once (xxh64); an n-gram's hash is a polynomial of its words'
hashes mod 2^64, computed for all n-grams of a document in ``n`` numpy operations (no Python
per n-gram), then mixed with the splitmix64 finaliser so that the high bits are uniform: the
hash range is cut into equal slices at the boundaries of datatrove's exact-dedup finder
(:func:`hash_range`), so each finder task holds one slice. 64-bit hashes: a false match needs a collision among ~10^12 n-grams at
SlimPajama scale (probability ~3%, and it would flag one document, not many).

**Tasks.** A local JSONL of the multiple-choice format of ``maskscale eval mc`` (``{context,
choices, label}``; the item's text is the context and its correct choice, what a web copy of
the benchmark holds) or of ``{text}``, or an lm-evaluation-harness task name, loaded offline
through its TaskManager (``include_path`` for local task YAMLs): its evaluation documents,
``doc_to_text`` and the target. A bad line stops with the file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

WORD = re.compile(r"\w+")
_MUL = np.uint64(0x9E3779B97F4A7C15)  # the polynomial's base (odd)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
QUERY = np.dtype([("hash", "<u8"), ("doc", "<u4"), ("pos", "<u4")])
"""One n-gram of a query document (holdout document or task item): hash, document, word."""
HASH_SCHEME = "words-lower-xxh64-poly-splitmix/v1"
"""Enters the keys of everything built from these hashes: a new scheme rebuilds them."""


class TaskLoadError(ValueError):
    """A task file or name that cannot be read; the message names what to fix."""


def words(text: str) -> list[str]:
    """The normalised words of ``text``: lowercased, punctuation and whitespace dropped."""
    return WORD.findall(text.lower())


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place (uniform high bits for the hash-range slices)."""
    with np.errstate(over="ignore"):
        h ^= h >> _S30
        h *= _M1
        h ^= h >> _S27
        h *= _M2
        h ^= h >> _S31
    return h


def ngram_hashes(word_list: list[str], n: int) -> np.ndarray:
    """uint64 hash of every n-gram, in order (index i = the n-gram starting at word i)."""
    count = len(word_list) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    w = np.fromiter(map(xxhash.xxh64_intdigest, word_list), dtype=np.uint64, count=len(word_list))
    acc = w[:count].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            acc *= _MUL
            acc += w[k : k + count]
    return _mix(acc)


def text_hashes(text: str, n: int) -> np.ndarray:
    return ngram_hashes(words(text), n)


def sorted_unique(hashes: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D array by one sort (numpy 2's ``np.unique`` was ~40x slower on
    uint64 hashes here, the signature stage's largest cost)."""
    s = np.sort(hashes)
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def hash_range(hashes: np.ndarray, workers: int) -> np.ndarray:
    """The finder slice of each hash, at the boundaries of datatrove's exact-dedup signatures
    (``ExactDedupSignature.save_hashes``): slice i holds ``(i*per, (i+1)*per]`` with ``per =
    (2^64-1) // workers`` (0 in slice 0), the last slice everything above."""
    per = np.uint64((2**64 - 1) // workers)
    below = np.maximum(hashes, np.uint64(1)) - np.uint64(1)
    return np.minimum(below // per, workers - 1).astype(np.int64)


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """An evaluation task as the texts of its items (one string per item)."""

    name: str
    items: list[str]

    def content_sha256(self) -> str:
        """Changes whenever any item's text does: enters the keys of what it decontaminates."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(item.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


def load_tasks(specs: list[str], include_path: str | None = None) -> list[Task]:
    """Each spec: a ``.jsonl`` file (named by its stem) or an lm-eval task name."""
    tasks = [_jsonl_task(Path(s)) if s.endswith(".jsonl") else None for s in specs]
    names = [s for s, t in zip(specs, tasks) if t is None]
    harness = dict(_harness_tasks(names, include_path)) if names else {}
    out = [t if t is not None else harness[s] for s, t in zip(specs, tasks)]
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise TaskLoadError(f"two tasks are named {t.name!r}; rename one of the files")
        seen.add(t.name)
    return out


def _jsonl_task(path: Path) -> Task:
    if not path.is_file():
        raise TaskLoadError(f"task file {path} does not exist")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskLoadError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise TaskLoadError(f"{where}: expected an object with 'context' or 'text'")
        items.append(_item_text(rec, where))
    if not items:
        raise TaskLoadError(f"task file {path} holds no items")
    return Task(path.stem, items)


def _item_text(rec: dict, where: str) -> str:
    if "text" in rec and "context" not in rec:
        if not isinstance(rec["text"], str):
            raise TaskLoadError(f"{where}: field 'text' must be a string")
        return rec["text"]
    context, choices, label = rec.get("context"), rec.get("choices"), rec.get("label")
    if not isinstance(context, str):
        raise TaskLoadError(f"{where}: field 'context' must be a string (or give 'text')")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskLoadError(f"{where}: field 'choices' must be a list of strings")
    if not isinstance(label, int) or not 0 <= label < len(choices):
        raise TaskLoadError(f"{where}: field 'label' must index 'choices' (0..{len(choices) - 1})")
    return f"{context} {choices[label]}"


def _harness_tasks(names: list[str], include_path: str | None) -> list[tuple[str, Task]]:
    """lm-eval tasks (or groups: every task in them) as item texts, offline."""
    from lm_eval.tasks import TaskManager, get_task_dict

    if include_path is not None and not Path(include_path).is_dir():
        raise TaskLoadError(f"--include-path {include_path}: no such directory of task YAMLs")
    local = TaskManager(include_path=include_path, include_defaults=False) if include_path \
        else None  # fmt: skip
    manager = local if local and set(names) <= set(local.all_tasks) \
        else TaskManager(include_path=include_path)  # fmt: skip
    unknown = [n for n in names if n not in set(manager.all_tasks)]
    if unknown:
        raise TaskLoadError(f"unknown task(s) {unknown}: not a .jsonl file nor an lm-eval "
                            "task (local YAMLs: --include-path)")  # fmt: skip
    out = []
    for name in names:
        try:
            loaded = get_task_dict([name], manager)
        except Exception as e:  # datasets raises several kinds when a dataset is not cached
            raise TaskLoadError(
                f"task {name}: its documents could not be loaded offline ({type(e).__name__}: "
                f"{str(e)[:200]}); download the dataset once with network access, or use a "
                "local .jsonl"
            ) from None
        items = [text for task in _leaves(loaded) for text in _harness_items(task)]
        out.append((name, Task(name, items)))
    return out


def _leaves(d) -> list:
    out = []
    for v in d.values():
        out += _leaves(v) if isinstance(v, dict) else [v]
    return out


def _harness_items(task) -> list[str]:
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    texts = []
    for doc in docs:
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else []
        if isinstance(text, int):  # e.g. winogrande: the text is one of the choices
            text = choices[text] if 0 <= text < len(choices) else ""
        if isinstance(target, int) and choices:
            target = choices[target] if 0 <= target < len(choices) else ""
        if isinstance(target, list):
            target = target[0] if target else ""
        texts.append(f"{text}{task.config.target_delimiter}{target}")
    return texts


class TaskNgrams:
    """The n-gram hashes of evaluation tasks, to test documents against (``decontaminate:``).

    Small enough to travel inside the split stage's pickled pipeline (8 bytes per distinct
    n-gram: a few MB for a benchmark of ten thousand items). ``key`` is what enters the keys
    of the stages it changes: the n-gram size, the hash scheme and each task's content hash.
    """

    def __init__(self, tasks: list[Task], n: int):
        self.n, self.names = n, [t.name for t in tasks]
        empty = np.empty(0, dtype=np.uint64)
        self.per_task = [sorted_unique(np.concatenate([text_hashes(i, n) for i in t.items] or
                                                      [empty])) for t in tasks]  # fmt: skip
        self.hashes = sorted_unique(np.concatenate(self.per_task or [empty]))
        self.key = {"ngram": n, "scheme": HASH_SCHEME,
                    "tasks": {t.name: t.content_sha256() for t in tasks}}  # fmt: skip

    def tasks_in(self, text: str) -> list[str]:
        """The tasks sharing at least one n-gram with ``text`` (none: [])."""
        h = text_hashes(text, self.n)
        if not h.size or not self.hashes.size:
            return []
        idx = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        hit = h[self.hashes[idx] == h]
        if not hit.size:
            return []
        return [name for name, own in zip(self.names, self.per_task) if np.isin(hit, own).any()]
