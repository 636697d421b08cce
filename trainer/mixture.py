"""The deterministic mixture schedule: stream position -> (component, draw) -> row.

Used by :mod:`trainer.data`, whose docstring states the contract (one-integer state, ranks,
keys). This module owns the part that maps a global stream position ``p`` to a row index.

Components
  A *component* is a set of rows with its own permutations: the whole selection
  (``weights=None``), or one source of one split. Rows are global indices into the
  concatenation of the selected splits (sorted by name), so several splits behave exactly like
  one larger split whose sources are the ``(split, source)`` pairs.

Position -> row
  * Natural order (``weights=None``): all ``n`` rows form one group; epoch ``e = p // n`` and
    ``row = perm_e(p % n)`` where ``perm_e`` is a keyed pseudo-random permutation of
    ``[0, n)``, a new one per epoch.
  * Mixture: each weighted component is its own group with its own permutations. Positions
    are cut into blocks of ``BLOCK`` positions. Before block ``b`` group ``s`` has been drawn
    ``Q_s(b) = floor(b * BLOCK * w_s)`` times (the heaviest group takes the remainder, so the
    quotas sum to ``b * BLOCK``). A keyed shuffle of block ``b``'s positions gives each group
    ``Q_s(b+1) - Q_s(b)`` of them; the ``j``-th position (in stream order) of block ``b`` that
    belongs to group ``s`` is that group's draw ``k = Q_s(b) + j``, and draw ``k`` reads row
    ``perm_{s, k // n_s}(k % n_s)`` of the group. So group counts equal ``p * w_s`` (to one
    draw) at every block boundary and fluctuate only within a block, and a group is exhausted
    before any of its rows repeats (a heavily weighted small group is upsampled by whole
    epochs). Components without a weight (or with weight 0) are not read.
  * The permutations are Feistel networks on the smallest power of four >= ``n`` with cycle
    walking; round keys come from ``np.random.default_rng([seed, group, epoch])``. That gives
    random access in O(1) memory (no n-sized index array per rank, which at 10^8 rows would be
    gigabytes) and is fully vectorised.

Weight keys (:func:`resolve_weights`)
  ``source`` applies to that source in every selected split; ``split/source`` to one
  component; ``split/*`` to every source of that split (each matching component gets the
  weight -- it is not shared among them). When several keys match a component the most
  specific wins: ``split/source`` > ``split/*`` > ``source``. A key is read as ``split/...``
  when the text before its first ``/`` is a selected split, else as a source name. Weights are
  then normalised to sum to 1. With one split, components are named by source alone, so
  single-split runs keep their names, group indices and hence their exact stream.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

BLOCK = 4096
"""Mixture schedule block (positions): group counts are exact at every block boundary."""

_FEISTEL_ROUNDS = 6


class _Permutation:
    """Keyed pseudo-random permutation of ``[0, n)`` with O(1) memory and random access."""

    def __init__(self, n: int, key: list[int]):
        self.n = n
        bits = max(2, math.ceil(math.log2(max(n, 2))))
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        rng = np.random.default_rng(key)
        self.round_keys = rng.integers(0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            f = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
            f ^= f >> np.uint64(29)
            f *= np.uint64(0xBF58476D1CE4E5B9)
            f ^= f >> np.uint64(32)
            left, right = right, left ^ (f & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        y = self._feistel(np.asarray(idx, dtype=np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():  # cycle walking: re-permute until the value lands inside [0, n)
            y[out] = self._feistel(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


class _Group:
    """Rows of one component (or of the whole selection): runs of global rows + shuffles."""

    def __init__(self, index: int, runs: list[tuple[int, int]], seed: int):
        self.index, self.seed = index, seed
        self.run_start = np.array([s for s, _ in runs], dtype=np.int64)
        self.run_cum = np.concatenate([[0], np.cumsum([n for _, n in runs])]).astype(np.int64)
        self.rows = int(self.run_cum[-1])
        self._perms: dict[int, _Permutation] = {}

    def perm(self, epoch: int) -> _Permutation:
        if epoch not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[epoch] = _Permutation(self.rows, [self.seed, self.index, epoch])
        return self._perms[epoch]

    def draws_to_rows(self, k: np.ndarray) -> np.ndarray:
        """Draw numbers of this group -> global row indices."""
        epoch, within = np.divmod(k, self.rows)
        local = np.empty_like(k)
        for e in np.unique(epoch):
            sel = epoch == e
            local[sel] = self.perm(int(e))(within[sel])
        run = np.searchsorted(self.run_cum, local, side="right") - 1
        return self.run_start[run] + (local - self.run_cum[run])


class _Stream:
    """Global position -> global row, per the scheme in the module docstring."""

    def __init__(self, groups: list[_Group], weights: list[float], seed: int):
        self.groups, self.seed = groups, seed
        self.w = np.asarray(weights, dtype=np.float64)
        self.heavy = int(np.argmax(self.w))
        if len(groups) * (len(groups) - 1) > BLOCK:
            raise ValueError(f"at most 64 weighted components are supported, got {len(groups)}")
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def quotas(self, block: int) -> np.ndarray:
        """Q_s(block): draws of each group before ``block``."""
        q = np.floor(block * BLOCK * self.w).astype(np.int64)
        q[self.heavy] = block * BLOCK - (q.sum() - q[self.heavy])
        return q

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(group, draw number) of each of the BLOCK positions of ``block``."""
        if block not in self._blocks:
            if len(self._blocks) > 8:
                self._blocks.clear()
            q0, q1 = self.quotas(block), self.quotas(block + 1)
            first = np.concatenate([[0], np.cumsum(q1 - q0)])
            perm = _Permutation(BLOCK, [self.seed, len(self.groups), 1, block])
            group = np.searchsorted(first, perm(np.arange(BLOCK)), side="right") - 1
            draw = np.empty(BLOCK, dtype=np.int64)
            for g in range(len(self.groups)):  # the j-th position of g in the block: draw Q_g + j
                where = np.flatnonzero(group == g)
                draw[where] = q0[g] + np.arange(len(where))
            self._blocks[block] = (group, draw)
        return self._blocks[block]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.groups) == 1:
            return self.groups[0].draws_to_rows(positions)
        group = np.empty_like(positions)
        draw = np.empty_like(positions)
        blocks, slots = np.divmod(positions, BLOCK)
        for b in np.unique(blocks):
            sel = blocks == b
            block_group, block_draw = self._block(int(b))
            group[sel], draw[sel] = block_group[slots[sel]], block_draw[slots[sel]]
        out = np.empty_like(positions)
        for g in np.unique(group):
            sel = group == g
            out[sel] = self.groups[g].draws_to_rows(draw[sel])
        return out

    def epoch(self, position: int) -> int:
        """Completed passes over the most repeated group when ``position`` is reached."""
        if len(self.groups) == 1:
            return position // self.groups[0].rows
        q = np.floor(position * self.w).astype(np.int64)
        return int(max(qs // g.rows for qs, g in zip(q, self.groups)))


# ----------------------------------------------------------------------------- weights


def component_name(split: str, source: str, multi_split: bool) -> str:
    """A component's name in ``weights`` / state: ``source`` for one split, else ``split/source``."""
    return f"{split}/{source}" if multi_split else source


def resolve_weights(
    weights: dict[str, float], components: list[tuple[str, str]], splits: list[str]
) -> dict[str, float]:
    """Weight keys -> {component name: normalised weight > 0}, sorted by name.

    ``components`` are the ``(split, source)`` pairs present in the selected ``splits``; key
    forms and precedence are in the module docstring. Raises ValueError naming a bad key.
    """
    multi = len(splits) > 1
    sources = sorted({src for _, src in components})
    by_split = {sp: sorted(src for s, src in components if s == sp) for sp in splits}
    valid = sources + [f"{sp}/*" for sp in splits]
    valid += [f"{sp}/{src}" for sp in splits for src in by_split[sp]]
    exact: dict[tuple[str, str], float] = {}
    split_wide: dict[str, float] = {}
    plain: dict[str, float] = {}
    for key, w in weights.items():
        if not isinstance(w, numbers.Real) or isinstance(w, bool) or not 0 <= w < math.inf:
            raise ValueError(f"mixture weight {key!r}: must be a finite number >= 0, got {w!r}")
        head, slash, tail = key.partition("/")
        if slash and head in splits:
            if tail == "*":
                split_wide[head] = w
            elif tail in by_split[head]:
                exact[(head, tail)] = w
            else:
                raise ValueError(
                    f"mixture weights key {key!r}: split {head!r} has no source {tail!r}; "
                    f"valid keys: {valid}"
                )
        elif key in sources:
            plain[key] = w
        else:
            what = "split" if slash else "source"
            raise ValueError(
                f"mixture weights name unknown {what} in key {key!r} (splits {splits}, sources "
                f"{sources}); valid keys: {valid}"
            )
    resolved: dict[str, float] = {}
    won = dict.fromkeys(weights, 0)  # components each key decided (for the total, see below)
    for sp, src in components:
        for table, k, key in (
            (exact, (sp, src), f"{sp}/{src}"),
            (split_wide, sp, f"{sp}/*"),
            (plain, src, src),
        ):
            if k in table:
                resolved[component_name(sp, src, multi)] = float(table[k])
                won[key] += 1
                break
    # summed in the caller's key order, so plain single-split weights normalise bit-for-bit
    # as they always did (the stream depends on the exact floats through the quotas)
    total = sum(weights[k] * n for k, n in won.items() if n)
    if total <= 0:
        raise ValueError(
            f"mixture weights must give some component a weight > 0, got {weights} "
            f"(valid keys: {valid})"
        )
    return {c: resolved[c] / total for c in sorted(resolved) if resolved[c] > 0}
