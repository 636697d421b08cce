"""Generation: text out of a trained run, and what it costs.

Holds the samplers (``sampling``: MDM reverse process with low-confidence or random unmasking,
blocks and CFG; ARM greedy/top-p with a KV cache from ``kv_cache``), ``maskscale sample``
(``cli``), ``maskscale eval gen`` (``gen``: time per answer against judge perplexity) and the
lm-evaluation-harness's ``generate_until`` requests (``generate``). May import ``eval.measure``
(loading, likelihood, outputs), ``trainer`` and ``pipeline``; nothing else in ``eval/``.
"""
