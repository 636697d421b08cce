"""Text generation from trained runs: the MDM reverse process and ARM (KV-cache) sampling.

One implementation serves ``maskscale sample`` (``cli``), the lm-evaluation-harness
models' ``generate_until`` (eval.zeroshot.harness) and the generation studies; it works on token ids
(tokenising is the caller's job). ``Sampler.generate(prompts)`` returns one ``Sample`` per
prompt: the answer ids (cut before the first EOS), whether an EOS ended it, and how many prompt
tokens were cut from the left so that prompt + answer fit the model's context.

MDM (paper-notes.md, "Sampling"): a row is ``prompt + L mask tokens``; the time grid is
``linspace(1, 1e-5, steps + 1)``; the step from t to s predicts every still-masked slot at once
(x0 = Gumbel-max sample, see below) and reveals some of them:

* ``random``: each masked slot independently with probability ``1 - s/t``;
* ``low-confidence``: the ``k = round(#masked * (1 - s/t))`` slots whose prediction has the
  highest probability (softmax of the guided logits), leftmost first on ties (probabilities
  are compared at a 1e-5 resolution, see ``TIE_RESOLUTION``). ``#masked`` and
  so k are per sample, never pooled over the batch.

Semi-autoregressive decoding (``block_length``, LLaDA's): the L slots are cut into blocks
filled left to right; each block runs ``steps / blocks`` steps of its own grid over its slots
only, while later blocks stay masked (they are still attended to). Without it, a model
fine-tuned on EOS-padded rows reveals the confident EOS tail first and the EOS run then creeps
left into the answer (empty or truncated answers); blocks keep the answer's start first.

Revealed tokens are never re-masked. The grid ends at 1e-5, not 0, so the last step reveals
whatever is still masked (otherwise a fraction 1e-5/t of slots could stay masked). With
``steps = L`` and low-confidence unmasking exactly one token is revealed per step. Unsupervised
classifier-free guidance (``cfg_scale = w``, as in ``likelihood``): the unconditional twin of
each row has its prompt replaced by masks, runs in the same forward, and the logits are
``uncond + (w + 1) (cond - uncond)``. The output head runs only at still-masked slots
(``random``: only at the slots revealed this step), and a step's token choice, confidences and
reveals run for the whole batch at once (per row only where a row's own noise is drawn).

ARM: prompts are left-padded and decoded with a KV cache (``kv_cache``); ``cache=False``
recomputes the full forward for every new token through ``Transformer.forward`` (the reference
the cache is tested against). Generation stops at EOS (not part of the answer), after L tokens,
or when the caller's ``stop`` callback says so (stop strings).

Token choice, both families: logits / temperature in float64, optional nucleus (top-p) filter,
then Gumbel-max (``argmax(logits/T + g)``, g = -log(-log u)), which samples the softmax exactly;
temperature 0 is plain argmax. Every row draws its noise from its own generator seeded with a
hash of (seed, its prompt tokens), so a prompt's sample does not depend on what shares its batch
or on the batch size. Batches of prompts of unequal length are right-padded (MDM: per-row
``lengths`` hide pad keys) or left-padded (ARM cache: pad keys masked); padding never becomes a
generation slot and never reaches the answer. Both families apply the head through
``eval.generation.kv_cache.OutputHead`` (a faster layout for one-row products on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from eval.generation.kv_cache import CachedDecoder, OutputHead
from eval.measure.likelihood import request_key
from pipeline.configlib import ConfigError

STRATEGIES = ("low-confidence", "random")
F64 = torch.float64
T_MIN = 1e-5
"""Last time of the MDM grid linspace(1, T_MIN, steps + 1)."""
TIE_RESOLUTION = 1e-5
"""Low-confidence ranking compares probabilities rounded to this step, so values that differ
only by float noise (different batch shapes) tie and the leftmost wins: rows whose slots are
almost interchangeable (an empty prompt) unmask in the same order in any batch."""


@dataclass
class SamplingConfig:
    """How answers are sampled. Fields an ARM does not use (steps, strategy) are ignored."""

    length: int = 64
    """New tokens L: the MDM's answer slots; the most an ARM generates."""
    steps: int | None = None
    """MDM reverse-process steps; None = ``length`` (one token per step with low-confidence)."""
    strategy: str = "low-confidence"
    """MDM unmasking: ``low-confidence`` (most probable first) or ``random``."""
    temperature: float = 0.0
    """Softmax temperature of the Gumbel-max draw; 0 = argmax (deterministic)."""
    top_p: float = 1.0
    """Nucleus sampling: draw only from the most probable tokens covering top_p (1 = all)."""
    cfg_scale: float = 0.0
    """Unsupervised classifier-free guidance scale w (MDM only); 0 = no guidance."""
    seed: int = 0
    """Hashed with each prompt's tokens into that row's generator seed."""
    batch_size: int = 16
    """Prompts per forward batch (CFG twins come on top)."""
    stop_at_eos: bool = True
    """ARM: stop a row at EOS. MDM: drop the answer from the first EOS on."""
    cache: bool = True
    """ARM: KV-cache decoding; False recomputes every prefix (slow; the test reference)."""
    block_length: int | None = None
    """MDM semi-autoregressive decoding (LLaDA's): the L slots are filled block by block, left
    to right, each block with ``steps / blocks`` steps of its own time grid; None = one block
    (the paper's plain reverse process). ``steps`` must be a multiple of the block count."""

    @property
    def n_steps(self) -> int:
        return self.length if self.steps is None else self.steps

    @property
    def n_blocks(self) -> int:
        return -(-self.length // (self.block_length or self.length))

    def validate(self) -> None:
        for key in ("length", "batch_size", "n_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                name = "steps" if key == "n_steps" else key
                raise ConfigError(f"sampling.{name}: must be a positive integer, got {value!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"sampling.strategy: {self.strategy!r} is not one of {STRATEGIES}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"sampling.temperature: must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: must be in (0, 1], got {self.top_p!r}")
        if not math.isfinite(self.cfg_scale):
            raise ConfigError(f"sampling.cfg_scale: must be finite, got {self.cfg_scale!r}")
        if self.block_length is not None:
            if not isinstance(self.block_length, int) or self.block_length < 1:
                raise ConfigError(
                    f"sampling.block_length: must be a positive integer, got {self.block_length!r}"
                )
            if self.n_steps % self.n_blocks:
                raise ConfigError(
                    f"sampling.steps: {self.n_steps} is not a multiple of the {self.n_blocks} "
                    f"blocks of {self.block_length} slots in L={self.length}; choose steps = "
                    f"k * {self.n_blocks}"
                )


@dataclass(frozen=True)
class Sample:
    """One generated answer."""

    tokens: list[int]
    """Answer ids, without the EOS that ended it (MDM: everything from the first EOS on is
    dropped)."""
    eos: bool
    """Whether an EOS ended the answer."""
    prompt_cut: int
    """Prompt tokens dropped from the left so that prompt + L fits the model's seq_len."""


StepHook = Callable[[int, list[int], torch.Tensor, torch.Tensor], None]
"""MDM ``on_step(step, prompt indices, masked bool[B, L], answer int64[B, L])`` after each step
of a batch (row b is prompt ``indices[b]``; answer holds the mask id at still-masked slots);
for tests and visualisations."""
StopFn = Callable[[int, list[int]], bool]
"""ARM ``stop(prompt index, answer so far) -> bool``: True ends that row (stop strings)."""


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None
) -> torch.Tensor:
    """Token ids [N] for logits [N, V]: argmax at temperature 0, else Gumbel-max in float64
    over logits / temperature after the top-p filter (noise from ``gen``)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.double() / temperature
    if top_p < 1:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # the top token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, -math.inf)
    u = torch.rand(z.shape, generator=gen, device=z.device, dtype=torch.float64)
    return z.sub_(u.log_().neg_().log_()).argmax(dim=-1)  # z - log(-log u), in place


def log_confidence(logits: torch.Tensor, x0: torch.Tensor, greedy: bool) -> torch.Tensor:
    """log softmax(logits)[x0] per row (fp32 [N]); ``greedy``: x0 is each row's argmax, so its
    logit is the row maximum and one pass of exp over the vocabulary suffices. Overwrites
    ``logits`` (the one full-vocabulary temporary it needs)."""
    top = logits.gather(1, x0[:, None])
    if greedy:
        return -logits.sub_(top).exp_().sum(dim=-1).log()
    peak = logits.amax(dim=-1, keepdim=True)
    return (top - peak)[:, 0] - logits.sub_(peak).exp_().sum(dim=-1).log()


class Sampler:
    """Samples answers from one model; see the module docstring.

    ``model``: a ``trainer.model.Transformer`` in eval mode on its device. ``eos_id`` also
    stands in for an empty ARM prompt (documents start after an EOS).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        causal: bool,
        mask_id: int,
        eos_id: int,
        seq_len: int | None = None,
        cfg: SamplingConfig | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else SamplingConfig()
        self.cfg.validate()
        self.model, self.causal = model, bool(causal)
        self.mask_id, self.eos_id = int(mask_id), int(eos_id)
        if getattr(model, "causal", self.causal) != self.causal:
            raise ConfigError(f"Sampler(causal={causal}) does not match the model's attention")
        self.seq_len = int(seq_len if seq_len is not None else model.cfg.seq_len)
        if self.cfg.length >= self.seq_len:
            raise ConfigError(
                f"sampling.length={self.cfg.length} leaves no room for a prompt in the model's "
                f"seq_len={self.seq_len}; ask for at most {self.seq_len - 1} new tokens"
            )
        if self.causal and self.cfg.cfg_scale != 0:
            raise ConfigError(
                f"cfg_scale={self.cfg.cfg_scale}: classifier-free guidance is defined for masked "
                "diffusion models only; use cfg_scale=0 with an autoregressive (causal) model"
            )
        self.device = next(model.parameters()).device
        self.head = OutputHead(model)

    @classmethod
    def from_loaded(cls, loaded, cfg: SamplingConfig | None = None) -> Sampler:
        """Sampler for an ``eval.measure.loading.LoadedModel``."""
        return cls(
            loaded.model,
            causal=loaded.causal,
            mask_id=loaded.mask_id,
            eos_id=loaded.eos_id,
            seq_len=loaded.seq_len,
            cfg=cfg,
        )

    # ------------------------------------------------------------------------- driver

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        seeds: Sequence[int] | None = None,
        stop: StopFn | None = None,
        on_step: StepHook | None = None,
        progress: bool = False,
    ) -> list[Sample]:
        """One Sample per prompt, in order. ``seeds`` (one per prompt) replace ``cfg.seed``."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        keep = self.seq_len - self.cfg.length
        cut = [max(0, len(p) - keep) for p in prompts]
        rows = [[int(t) for t in p[c:]] for p, c in zip(prompts, cut, strict=True)]
        for i, row in enumerate(rows):
            bad = [t for t in row if not 0 <= t < self.model.head.out_features]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} are outside the vocabulary")
        keys = [
            request_key(self.cfg.seed if seeds is None else int(seeds[i]), row, ())
            for i, row in enumerate(rows)
        ]
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        out: list[Sample | None] = [None] * len(rows)
        size = self.cfg.batch_size
        batches = [order[lo : lo + size] for lo in range(0, len(order), size)]
        for batch in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
            prompts_b = [rows[i] for i in batch]
            gens = [self._generator(keys[i]) for i in batch]
            if self.causal:
                row_stop = None if stop is None else (lambda j, ids, b=batch: stop(b[j], ids))
                answers = self._arm(prompts_b, gens, row_stop)
            else:
                hook = None if on_step is None else (lambda *a, b=batch: on_step(a[0], b, *a[1:]))
                answers = self._mdm(prompts_b, gens, hook)
            for i, (tokens, eos) in zip(batch, answers, strict=True):
                out[i] = Sample(tokens, eos, cut[i])
        return out  # type: ignore[return-value]

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(key)

    # ------------------------------------------------------------------------- MDM

    def _mdm_logits(
        self, ids: torch.Tensor, lengths: torch.Tensor, n_prompt: torch.Tensor, where
    ) -> torch.Tensor:
        """Guided logits [N, V] (fp32) at the (row, position) pairs ``where``."""
        rows, pos = where
        if self.cfg.cfg_scale == 0:
            hidden = self.model.features(ids, lengths)
            return self.head(hidden[rows, pos])
        uncond = ids.clone()
        prompt_slots = torch.arange(ids.shape[1], device=ids.device)[None] < n_prompt[:, None]
        uncond[prompt_slots] = self.mask_id
        hidden = self.model.features(torch.cat([ids, uncond]), torch.cat([lengths, lengths]))
        cond = self.head(hidden[rows, pos])
        base = self.head(hidden[rows + ids.shape[0], pos])
        return torch.lerp(base, cond, self.cfg.cfg_scale + 1.0)

    def _random_reveals(self, masked, t: float, s: float, last: bool, gens) -> torch.Tensor:
        """``random``: bool[B, L], each masked slot with probability 1 - s/t (all of them at the
        last step). Drawn before the forward, so the head runs only where a token appears."""
        if last:
            return masked.clone()
        chosen = torch.zeros_like(masked)
        for i in range(masked.shape[0]):
            slots = masked[i].nonzero()[:, 0]
            if slots.numel():
                u = torch.rand(slots.numel(), generator=gens[i], device=masked.device, dtype=F64)
                chosen[i, slots[u < 1.0 - s / t]] = True
        return chosen

    @staticmethod
    def _most_confident(logp, rows, slots, scored, t: float, s: float) -> torch.Tensor:
        """``low-confidence``: bool[B, L], in each row the k = round(n (1 - s/t)) of its n
        scored slots whose prediction is most probable (``logp`` [N] at the slots ``rows,
        slots``), leftmost first on ties; all rows at once."""
        conf = torch.full(scored.shape, -1.0, dtype=F64, device=scored.device)  # -1: not scored
        conf[rows, slots] = torch.round(logp.double().exp() / TIE_RESOLUTION)
        order = torch.sort(conf, dim=1, descending=True, stable=True).indices
        k = torch.floor(scored.sum(dim=1).double() * (1.0 - s / t) + 0.5)
        rank = torch.arange(scored.shape[1], device=scored.device)
        return torch.zeros_like(scored).scatter_(1, order, rank[None] < k[:, None])

    @torch.inference_mode()
    def _mdm(self, prompts: list[list[int]], gens, on_step: StepHook | None):
        """(answer ids, eos) per prompt: the reverse process over L slots after each prompt."""
        b, length, dev = len(prompts), self.cfg.length, self.device
        n_prompt = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(n_prompt.max()) + length
        ids = torch.full((b, width), self.mask_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = (n_prompt + length).cpu()  # pads beyond a row's length are never attended to
        slot_pos = n_prompt[:, None] + torch.arange(length, device=dev)  # [B, L]
        masked = torch.ones(b, length, dtype=torch.bool, device=dev)
        answer = torch.full((b, length), self.mask_id, dtype=torch.long, device=dev)
        per_block = self.cfg.n_steps // self.cfg.n_blocks
        width_b = self.cfg.block_length or length
        times = torch.linspace(1.0, T_MIN, per_block + 1, dtype=F64).tolist()
        random = self.cfg.strategy == "random"
        state = (ids, lengths, n_prompt, slot_pos, masked, answer)
        for step in range(self.cfg.n_steps):
            block, i = divmod(step, per_block)
            live = masked
            if self.cfg.n_blocks > 1:  # earlier blocks are done; later ones wait
                live = masked.clone()
                live[:, : block * width_b] = False
                live[:, (block + 1) * width_b :] = False
            t, s, last = times[i], times[i + 1], i == per_block - 1
            scored = self._random_reveals(live, t, s, last, gens) if random else live
            if scored.any():
                self._mdm_step(state, scored, gens, (t, s, last))
            if on_step is not None:
                on_step(step, masked.clone(), answer.clone())
        return [self._cut_eos(row) for row in answer.tolist()]

    def _mdm_step(self, state, scored, gens, times) -> None:
        """Predict the ``scored`` slots, reveal (random or the last step: all of them;
        low-confidence: the most confident k per row) and write the revealed tokens into
        ``ids`` and ``answer``, clearing them in ``masked`` (``state``; ``times`` = (t, s,
        last))."""
        ids, lengths, n_prompt, slot_pos, masked, answer = state
        rows, slots = scored.nonzero(as_tuple=True)  # row-major: each row's slots together
        logits = self._mdm_logits(ids, lengths, n_prompt, (rows, slot_pos[rows, slots]))
        x0 = self._pick_per_row(logits, scored, gens)
        t, s, last = times
        reveal = scored
        if self.cfg.strategy == "low-confidence" and not last:
            logp = log_confidence(logits, x0, greedy=self.cfg.temperature == 0)
            reveal = self._most_confident(logp, rows, slots, scored, t, s)
        keep = reveal[rows, slots]
        rows, slots, tokens = rows[keep], slots[keep], x0[keep]
        answer[rows, slots] = tokens
        ids[rows, slot_pos[rows, slots]] = tokens
        masked[rows, slots] = False

    def _pick_per_row(self, logits, scored, gens) -> torch.Tensor:
        """x0 [N] for the scored slots' logits (row-major): one argmax at temperature 0,
        else each row's Gumbel-max draw from its own generator."""
        if self.cfg.temperature == 0:
            return logits.argmax(dim=-1)
        x0 = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        start = 0
        for i, count in enumerate(scored.sum(dim=1).tolist()):
            part = slice(start, start + count)
            start += count
            if count:
                x0[part] = pick_tokens(logits[part], self.cfg.temperature, self.cfg.top_p, gens[i])
        return x0

    def _cut_eos(self, tokens: list[int]) -> tuple[list[int], bool]:
        if self.cfg.stop_at_eos and self.eos_id in tokens:
            return tokens[: tokens.index(self.eos_id)], True
        return tokens, False

    # ------------------------------------------------------------------------- ARM

    def _arm_first(self, prompts: list[list[int]]):
        """(logits of the next token [B, V], a function feeding the chosen tokens [B] and
        returning the next logits): KV cache, or full recomputation without it."""
        b, dev = len(prompts), self.device
        width = max(len(p) for p in prompts)
        if self.cfg.cache:
            pad = torch.tensor([width - len(p) for p in prompts], device=dev)
            ids = torch.full((b, width), self.eos_id, dtype=torch.long, device=dev)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            decoder = CachedDecoder(self.model, self.head)
            logits, cache = decoder.prefill(ids, pad, width + self.cfg.length)
            return logits, lambda tokens: decoder.step(tokens, cache)
        seqs = [list(p) for p in prompts]

        def full_forward() -> torch.Tensor:
            lengths = torch.tensor([len(x) for x in seqs])
            ids = torch.full((b, int(lengths.max())), self.eos_id, dtype=torch.long)
            for i, x in enumerate(seqs):
                ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            with torch.inference_mode():
                hidden = self.model.features(ids.to(dev), lengths)
                last = hidden[torch.arange(b, device=dev), (lengths - 1).to(dev)]
                return self.head(last)

        def feed(tokens: torch.Tensor) -> torch.Tensor:
            for x, tok in zip(seqs, tokens.tolist(), strict=True):
                x.append(tok)
            return full_forward()

        return full_forward(), feed

    def _arm(self, prompts: list[list[int]], gens, stop: StopFn | None):
        """(answer ids, eos) per prompt, one token per step for every unfinished row."""
        prompts = [p if p else [self.eos_id] for p in prompts]
        logits, feed = self._arm_first(prompts)
        answers: list[list[int]] = [[] for _ in prompts]
        eos = [False] * len(prompts)
        active = list(range(len(prompts)))
        for n in range(self.cfg.length):
            tokens = torch.full((len(prompts),), self.eos_id, dtype=torch.long, device=self.device)
            if self.cfg.temperature == 0:  # no noise: one argmax for the batch
                tokens[active] = logits[active].argmax(dim=-1)
            for i in active if self.cfg.temperature > 0 else ():
                tokens[i] = pick_tokens(
                    logits[i : i + 1], self.cfg.temperature, self.cfg.top_p, gens[i]
                )[0]
            for i, tok in zip(list(active), tokens[active].tolist(), strict=True):
                if tok == self.eos_id and self.cfg.stop_at_eos:
                    eos[i] = True
                    active.remove(i)
                    continue
                answers[i].append(tok)
                if stop is not None and stop(i, answers[i]):
                    active.remove(i)
            if not active or n == self.cfg.length - 1:
                break
            logits = feed(tokens)
        return list(zip(answers, eos, strict=True))
