"""The rows each likelihood estimator runs for one request, and how their scores add up.

Why a module of its own: every estimator of ``likelihood`` is a *plan* - some rows (context
plus a partly masked continuation), the positions to score in them, and the weights that turn
those log-probabilities into samples of an estimate - and the two Monte Carlo plans carry the
estimator's mathematics, which is what their tests pin. Here a request is (context x,
continuation y = y_0 .. y_{l-1}); only continuation tokens are ever masked.

Notation: for a non-empty set M of continuation positions, ``g(M) = sum over j in M of
log p_theta(y_j | x, y with the positions of M masked)``, one forward of one row; ``gbar_k`` is
the mean of g over the C(l, k) sets of size k.

* ``fixed_count_plan`` (LLaDA's estimator, the default): sample i draws a count k_i from
  {1, .., l} and masks exactly k_i positions, a uniformly random set; its score is
  ``(l / k_i) g(M_i)``. The counts are stratified like the times below,
  ``k_i = floor(t_i l) + 1``: each k_i is uniform on {1, .., l}, and n samples use every count
  n / l times when l divides n. Expectation: ``sum_k (1/l)(l/k) gbar_k = sum_{k=1}^{l}
  gbar_k / k =: L``, the absorbing-diffusion ELBO of the model's log p(y | x) (noise floor
  eps = 0). No sample masks nothing, so none scores 0; at l = 1 every sample is the one row
  ``log p_theta(y_0 | x, [MASK])`` and the estimate is exact (the chain rule's value).
  Samples that draw the same set run one row (``Plan.count`` says for how many samples).
* ``inverse_t_plan`` (the 1/t estimator, the training objective's draws): sample i takes the
  stratified time t_i = (u + i/n) mod 1, masks each position independently with probability
  ``p_i = (1 - eps) t_i + eps`` and scores ``g(M_i) / p_i``; a sample that masks nothing
  scores 0 (and runs no row). Grouping masks by size, its expectation is
  ``L_eps = sum_k c_k gbar_k`` with ``c_k = C(l, k) / (1 - eps) * integral_eps^1 p^(k-1)
  (1-p)^(l-k) dp``. At eps = 0, ``c_k = C(l, k) B(k, l - k + 1) = 1/k``: the same L. For
  eps > 0 the weights shift by O(eps) (e.g. c_1 = (1 - eps)^(l-1)), so L_eps is the ELBO
  that training and ``maskscale eval ppl`` report for the run, and differs from L by O(eps);
  at l = 1, c_1 = 1 and both are unbiased for the exact value, but a 1/t sample is 0 with
  probability ~1/2 (at n = 1 half of all one-token answers score log-likelihood 0).

Both give every continuation token weight 1 on average (``E[1{j in M} * weight] = 1``); they
spread it differently over mask sizes, so their targets differ only as far as the model's
predictions change with how much of y is masked (not at all for a model that ignores y's other
tokens). Each is unbiased for its own target; tests/eval/measure/test_likelihood.py checks
both against these sums computed by enumerating every mask of a tiny trained MDM (l <= 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eval.measure.packing import RowBlock
from trainer.objectives import row_generator


@dataclass
class Plan:
    """A request's rows and how its scored entries add up to samples of the estimate.

    Entry s adds ``weight[s] * log p(target)`` to slot ``slot[s]``; slot u stands for
    ``count[u]`` of the ``n_samples`` samples (a slot without entries scores 0).
    """

    block: RowBlock
    weight: torch.Tensor
    """float64[S]: weight of each scored entry."""
    slot: torch.Tensor
    """int64[S]: the slot each entry adds to."""
    count: torch.Tensor
    """float64[U]: samples each slot stands for (sums to ``n_samples``)."""
    n_samples: int

    def aggregate(self, logp: torch.Tensor) -> tuple[float, float]:
        """(mean over samples, standard deviation of one sample; NaN for one sample)."""
        per_slot = torch.zeros(len(self.count), dtype=torch.float64)
        per_slot.index_add_(0, self.slot, self.weight * logp.double())
        n = self.n_samples
        mean = float((self.count * per_slot).sum() / n)
        if n == 1:
            return mean, math.nan
        return mean, math.sqrt(float((self.count * (per_slot - mean) ** 2).sum()) / (n - 1))


def _single(block: RowBlock) -> Plan:
    """Every entry with weight 1 in one deterministic sample."""
    n = int(block.row.numel())
    ones = torch.ones(n, dtype=torch.float64)
    return Plan(
        block, ones, torch.zeros(n, dtype=torch.long), torch.ones(1, dtype=torch.float64), 1
    )


def exact_plan(context: list[int], continuation: list[int]) -> Plan:
    """ARM: one row ``(x + y)[:-1]``; the output at m + j - 1 predicts y_j."""
    m, n = len(context), len(continuation)
    ids = torch.tensor([context + continuation[:-1]], dtype=torch.long)
    block = RowBlock(
        ids,
        m,
        torch.zeros(n, dtype=torch.long),
        m - 1 + torch.arange(n),
        torch.tensor(continuation),
    )
    return _single(block)


def chain_plan(context: list[int], continuation: list[int], mask_id: int, causal: bool) -> Plan:
    """l rows; row i masks y_i.. and scores y_i (at m + i, or m + i - 1 if causal)."""
    m, n = len(context), len(continuation)
    ids = torch.tensor([context + continuation], dtype=torch.long).repeat(n, 1)
    later = torch.arange(n)[None, :] >= torch.arange(n)[:, None]  # row i: positions >= i
    ids[:, m:][later] = mask_id
    shift = int(causal)
    if shift:
        ids = ids[:, :-1]  # the last token is never an input of a causal prediction
    block = RowBlock(
        ids, m, torch.arange(n), m - shift + torch.arange(n), torch.tensor(continuation)
    )
    return _single(block)


def stratified_times(g: torch.Generator, n: int) -> torch.Tensor:
    """float64[n]: t_i = (u + i/n) mod 1 with u ~ U[0, 1) the generator's first draw."""
    u = torch.rand(1, generator=g, dtype=torch.float64)
    return (u + torch.arange(n, dtype=torch.float64) / n) % 1.0


def _masked_rows(
    context: list[int], continuation: list[int], masks: torch.Tensor, mask_id: int
) -> RowBlock:
    """One row per mask (bool[R, l]), scoring every masked position."""
    m = len(context)
    ids = torch.tensor([context + continuation], dtype=torch.long).repeat(len(masks), 1)
    ids[:, m:][masks] = mask_id
    row, col = masks.nonzero(as_tuple=True)  # sorted by row
    return RowBlock(ids, m, row, m + col, torch.tensor(continuation)[col])


def inverse_t_plan(
    context: list[int], continuation: list[int], key: int, n: int, eps: float, mask_id: int
) -> Plan:
    """n stratified times, independent masks, weight 1/p; rows only for samples that mask."""
    g = row_generator(key)
    p = (1 - eps) * stratified_times(g, n) + eps
    masks = torch.rand(n, len(continuation), generator=g) < p[:, None]
    samples = masks.any(dim=1).nonzero()[:, 0]
    block = _masked_rows(context, continuation, masks[samples], mask_id)
    slot = samples[block.row]
    return Plan(block, 1.0 / p[slot], slot, torch.ones(n, dtype=torch.float64), n)


def fixed_count_masks(key: int, n: int, length: int) -> torch.Tensor:
    """bool[n, length]: sample i masks exactly k_i = floor(t_i * length) + 1 positions (t_i
    stratified), the k_i of a uniformly random permutation of the positions."""
    g = row_generator(key)
    k = (stratified_times(g, n) * length).long().clamp_(max=length - 1) + 1
    ranks = torch.rand(n, length, generator=g).argsort(dim=1).argsort(dim=1)
    return ranks < k[:, None]


def fixed_count_plan(
    context: list[int], continuation: list[int], key: int, n: int, mask_id: int
) -> Plan:
    """n samples of exactly k_i masks, weight l / k_i; one row per distinct mask."""
    masks = fixed_count_masks(key, n, len(continuation))
    distinct, _, count = torch.unique(masks, dim=0, return_inverse=True, return_counts=True)
    block = _masked_rows(context, continuation, distinct, mask_id)
    k = distinct.sum(dim=1).double()
    weight = len(continuation) / k[block.row]
    return Plan(block, weight, block.row.clone(), count.double(), n)
