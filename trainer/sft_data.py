"""Supervised fine-tuning data: prompt/answer JSONL -> fixed-length rows with an answer mask.

Why a separate reader: pretraining reads packed Arrow shards where every token is a target; SFT
reads small JSONL files of (prompt, answer) pairs where only the answer is learned, so each row
carries a second channel saying which of its tokens are answer tokens. A batch is one int64
tensor ``[B, 2, T+1]`` (channel 0 the tokens, channel 1 the 0/1 answer mask), so it travels
through ``trainer.engine.train_step`` exactly like a pretraining batch; the SFT objectives
(``trainer/sft_objectives.py``) read both channels.

Accepted records (one JSON object per line; blank lines are ignored):
  * ``{"prompt": ..., "response": ...}``, or ``"completion"`` instead of ``"response"`` (the
    layout of Berglund et al.'s reversal-curse files);
  * ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
    (also ``role``/``content`` and user/assistant). ``turns=first`` keeps the first
    human -> assistant exchange; ``turns=all`` packs every turn into one row with every
    assistant answer a target.

A row is ``prompt tokens + answer tokens + EOS`` (each answer of a conversation ends with EOS),
cut to ``seq_len + 1`` tokens (counted) and padded with EOS. As in the paper's SFT the EOS
padding belongs to the answer: it is a target, so the model learns where an answer ends
(``target=all`` makes every token a target: the unconditional loss on prompt+answer that the
paper's reversal-curse MDM uses). A record whose prompt leaves no answer token inside the first
``seq_len`` positions is skipped (counted). Malformed records (bad JSON, missing or non-string
fields, unknown roles, turns out of order, empty answers) are counted by reason and skipped;
one summary warning names ``file:line`` of the first few. A file with no valid record is an
error.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.configlib import ConfigError
from trainer.data import EVAL_KEY_SEED, CorpusLoader, mix_keys
from trainer.mixture import _Group, _Stream
from trainer.sft_config import SFTConfig

EXAMPLES_PER_REASON = 3
"""How many ``file:line`` examples the summary warning lists per skip reason."""
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard"})
SYSTEM_ROLES = frozenset({"system"})


class SFTDataWarning(UserWarning):
    """Records of an SFT file were skipped or cut (one summary per file)."""


# ----------------------------------------------------------------------------- parsing


class BadRecord(ValueError):
    """One record cannot be used; ``reason`` is its counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


Segment = tuple[str, bool]
"""(text, is answer) -- a record becomes a list of segments, answers ending with EOS."""


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise BadRecord("missing_field", f"no {key!r} field")
    if not isinstance(obj[key], str):
        raise BadRecord("not_string", f"{key!r} is {type(obj[key]).__name__}, not a string")
    return obj[key]


def _answer(text: str) -> str:
    if not text.strip():
        raise BadRecord("empty_answer", "the answer is empty")
    return text


def _prompt_record(obj: dict, template: str) -> list[Segment]:
    key = "response" if "response" in obj else "completion" if "completion" in obj else None
    if key is None:
        raise BadRecord("missing_field", "a prompt record needs 'response' or 'completion'")
    prompt = _text(obj, "prompt")
    return [(template.format(prompt=prompt), False), (_answer(_text(obj, key)), True)]


def _turn(item: object, index: int) -> tuple[str, str]:
    """(role class, text) of one conversation turn."""
    if not isinstance(item, dict):
        raise BadRecord("bad_turn", f"turn {index} is not an object")
    role_key = "from" if "from" in item else "role"
    text_key = "value" if "value" in item else "content"
    role, text = item.get(role_key), item.get(text_key)
    if not isinstance(role, str) or not isinstance(text, str):
        raise BadRecord("bad_turn", f"turn {index} needs string 'from' and 'value' fields")
    for name, roles in (("user", USER_ROLES), ("assistant", ASSISTANT_ROLES)):
        if role.lower() in roles:
            return name, text
    if role.lower() in SYSTEM_ROLES:
        return "system", text
    raise BadRecord("bad_role", f"turn {index} has role {role!r} (not human/gpt/system)")


def _conversation(obj: dict, turns: str, template: str) -> list[Segment]:
    conv = obj["conversations"]
    if not isinstance(conv, list):
        raise BadRecord("bad_turn", "'conversations' is not a list")
    parsed = [_turn(item, i) for i, item in enumerate(conv)]
    segments: list[Segment] = []
    if parsed and parsed[0][0] == "system":
        segments.append((parsed[0][1], False))
        parsed = parsed[1:]
    if len(parsed) % 2:  # a last question without an answer teaches nothing
        parsed = parsed[:-1]
    if not parsed:
        raise BadRecord("missing_field", "no human -> assistant exchange")
    for i in range(0, len(parsed), 2):
        (r_user, user), (r_bot, bot) = parsed[i], parsed[i + 1]
        if (r_user, r_bot) != ("user", "assistant"):
            raise BadRecord(
                "bad_turn_order", f"turns {i}, {i + 1} are {r_user}, {r_bot}; expected user, gpt"
            )
        segments += [(template.format(prompt=user), False), (_answer(bot), True)]
        if turns == "first":
            break
    return segments


def parse_record(line: str, turns: str = "first", template: str = "{prompt}") -> list[Segment]:
    """The segments of one JSONL line; raises :class:`BadRecord` naming the reason."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord("bad_json", f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadRecord("not_object", f"a JSON {type(obj).__name__}, not an object")
    if "conversations" in obj:
        return _conversation(obj, turns, template)
    if "prompt" in obj:
        return _prompt_record(obj, template)
    raise BadRecord("missing_field", "neither 'prompt' nor 'conversations'")


# ----------------------------------------------------------------------------- rows


@dataclass
class ReadReport:
    """What reading one SFT file did: records kept, skipped by reason, rows cut."""

    path: str
    records: int = 0
    kept: int = 0
    cut: int = 0
    longest: int = 0
    """Longest kept row before cutting and padding (prompt + answers + their EOS), tokens."""
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, line: int, detail: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{self.path}:{line}: {detail}")

    def summary(self) -> str:
        parts = [f"{n} {reason} (e.g. {'; '.join(self.examples[reason])})"
                 for reason, n in sorted(self.skipped.items())]  # fmt: skip
        text = f"{self.path}: kept {self.kept} of {self.records} records"
        if parts:
            text += f"; skipped {sum(self.skipped.values())}: " + ", ".join(parts)
        if self.cut:
            text += f"; {self.cut} rows cut to seq_len+1 tokens"
        return text

    def as_dict(self) -> dict:
        return {"records": self.records, "kept": self.kept, "cut": self.cut,
                "longest": self.longest, "skipped": dict(self.skipped)}  # fmt: skip


@dataclass
class SFTRows:
    """Fixed-length SFT rows: tokens int64[N, T+1], targets bool[N, T+1], source lines and
    text lengths (ids before the EOS padding)."""

    tokens: np.ndarray
    targets: np.ndarray
    lines: np.ndarray
    """1-based line of each row's record in its file."""
    lengths: np.ndarray
    """int64[N]: ids of each row that are its record (prompt, answers and their EOS); the rest
    is EOS padding, which the ARM never scores (the MDM keeps it as a target, see
    ``trainer/sft_objectives.py``)."""

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index: np.ndarray) -> SFTRows:
        return SFTRows(
            self.tokens[index], self.targets[index], self.lines[index], self.lengths[index]
        )

    def narrow(self, seq_len: int) -> SFTRows:
        """The first ``seq_len + 1`` columns (exact when every row's content fits: the rest
        is EOS padding, the same at any width)."""
        width = seq_len + 1
        return SFTRows(
            self.tokens[:, :width],
            self.targets[:, :width],
            self.lines,
            np.minimum(self.lengths, width),
        )

    def stacked(self, index: np.ndarray) -> np.ndarray:
        """int64[len(index), 2, T+1]: tokens and the 0/1 answer mask."""
        return np.stack([self.tokens[index], self.targets[index].astype(np.int64)], axis=1)


def build_row(
    ids: list[tuple[list[int], bool]], eos_id: int, seq_len: int, target: str
) -> tuple[np.ndarray, np.ndarray, bool, int] | None:
    """(tokens, targets, was cut, text length) of width seq_len + 1, or None if no answer token
    falls in the first seq_len positions. Each answer segment is followed by a target EOS;
    padding is EOS and a target (it continues the last answer; only the MDM scores it), and
    the text length counts the ids before it."""
    tokens: list[int] = []
    targets: list[bool] = []
    for seg, is_answer in ids:
        extra = [eos_id] if is_answer else []
        tokens += seg + extra
        targets += [is_answer or target == "all"] * (len(seg) + len(extra))
    width = seq_len + 1
    cut = len(tokens) > width
    tokens, targets = tokens[:width], targets[:width]
    if not any(targets[:seq_len]):
        return None
    pad = width - len(tokens)
    row = np.array(tokens + [eos_id] * pad, dtype=np.int64)
    mask = np.array(targets + [True] * pad, dtype=bool)
    return row, mask, cut, width - pad


def read_sft_file(
    path: str | Path, tokenizer, eos_id: int, seq_len: int, cfg: SFTConfig
) -> tuple[SFTRows, ReadReport]:
    """Parse, tokenize and pack every record of ``path``; warn once about skipped records."""
    from tqdm import tqdm

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"SFT data {path} does not exist; pass sft.data=FILE.jsonl")
    report = ReadReport(str(path))
    rows, masks, lines, lengths = [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(
            tqdm(f, desc=f"sft {path.name}", unit=" rec", leave=False), 1
        ):
            if not line.strip():
                continue
            report.records += 1
            try:
                segments = parse_record(line, cfg.turns, cfg.prompt_template)
            except BadRecord as e:
                report.skip(e.reason, number, str(e))
                continue
            ids = [(tokenizer.encode(t, add_special_tokens=False).ids, a) for t, a in segments]
            built = build_row(ids, eos_id, seq_len, cfg.target)
            if built is None:
                n = sum(len(s) for s, a in ids if not a)
                report.skip("prompt_too_long", number, f"prompt of {n} tokens >= seq_len {seq_len}")
                continue
            rows.append(built[0])
            masks.append(built[1])
            lines.append(number)
            lengths.append(built[3])
            report.cut += built[2]
            report.longest = max(report.longest, sum(len(s) + a for s, a in ids))
    report.kept = len(rows)
    if report.skipped or report.cut:
        warnings.warn(report.summary(), SFTDataWarning, stacklevel=2)
    if not rows:
        raise ConfigError(
            f"SFT data {path} has no valid record ({report.summary()}); expected JSONL lines "
            '{"prompt": ..., "response": ...} or {"conversations": [{"from": "human", '
            '"value": ...}, {"from": "gpt", "value": ...}]}'
        )
    width = seq_len + 1
    return (
        SFTRows(
            np.stack(rows).reshape(-1, width),
            np.stack(masks).reshape(-1, width),
            np.array(lines, dtype=np.int64),
            np.array(lengths, dtype=np.int64),
        ),
        report,
    )


def hold_out(rows: SFTRows, fraction: float, seed: int) -> tuple[SFTRows, SFTRows | None]:
    """(train, validation): a seeded random ``fraction`` of the rows (at least one) held out."""
    n = len(rows)
    n_val = min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n > 1 else 0
    if n_val == 0:
        return rows, None
    order = np.random.default_rng(seed).permutation(n)
    return rows.take(np.sort(order[n_val:])), rows.take(np.sort(order[:n_val]))


# ----------------------------------------------------------------------------- loading


class _RowsReader:
    """The ``gather`` interface of the corpus reader, over in-memory SFT rows."""

    def __init__(self, rows: SFTRows):
        self.data, self.rows = rows, len(rows)

    def gather(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.data.stacked(index), self.data.lengths[index]


class SFTLoader(CorpusLoader):
    """Micro-batches ``[micro, 2, T+1]`` of SFT rows, with the corpus loader's stream.

    The data order, per-row keys, rank split, epochs and ``state_dict``/``load_state_dict``
    are those of :class:`trainer.data.CorpusLoader` (a seeded permutation per epoch over all
    rows, positions -> ranks by the same formula), so SFT resumes exactly like pretraining.
    """

    def __init__(
        self,
        rows: SFTRows,
        *,
        micro_batch: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 3407,
    ):  # the corpus loader's attributes, without a corpus directory
        if micro_batch < 1 or global_batch < 1 or world_size < 1 or seed < 0:
            raise ValueError("micro_batch, global_batch, world_size >= 1 and seed >= 0")
        if not 0 <= rank < world_size or global_batch % (micro_batch * world_size):
            raise ValueError(
                f"rank {rank} / world {world_size}: global_batch {global_batch} must be a "
                f"multiple of micro_batch x world_size = {micro_batch} x {world_size}"
            )
        self.split, self.seed, self.weights, self.meta = "sft", seed, None, None
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.rank, self.world_size = rank, world_size
        self.accum = global_batch // (micro_batch * world_size)
        self._reader = _RowsReader(rows)
        self.seq_len = rows.tokens.shape[1] - 1
        self._stream = _Stream([_Group(0, [(0, len(rows))], seed)], [1.0], seed)
        self._step_start = 0
        self._micro_step = 0


def iter_sft_eval_batches(
    rows: SFTRows, batch_size: int, max_rows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(batch [b, 2, T+1], keys, text lengths) in file order; keys as for corpus validation
    rows."""
    total = len(rows) if max_rows is None else min(len(rows), max_rows)
    for start in range(0, total, batch_size):
        index = np.arange(start, min(start + batch_size, total), dtype=np.int64)
        yield (
            torch.from_numpy(rows.stacked(index)),
            torch.from_numpy(mix_keys(index, EVAL_KEY_SEED)),
            torch.from_numpy(rows.lengths[index]),
        )
