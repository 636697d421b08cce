"""Zero-shot benchmarks: multiple-choice and cloze tasks scored by likelihood.

Holds the lm-evaluation-harness adapter (``harness``: ``maskscale``/``maskscale-arm``/
``maskscale-mdm`` models), the model args and text-level scorer they and the direct runners share
(``text``), the pair split and local multiple-choice JSONL tasks (``tasks``), the temporal cloze
task built from a corpus's holdouts (``cloze``) and their commands ``maskscale eval harness |
mc | cloze`` (``cli``). May import ``eval.measure`` and ``eval.generation`` (the harness's
``generate_until``), ``trainer`` and ``pipeline``; never a study or the demo.
"""
