"""The evaluation floor: everything that reads a trained run (``eval -> trainer -> pipeline``).

Rooms, bottom to top; each may import the rooms *above it in this list* and itself, never one
below it or beside it (``tests/test_layering.py`` checks this and that no import circle exists):

- ``measure/``: the measurement core. Load a run (``loading``), sample and score a split's
  rows (``rows``, ``packing``, ``likelihood``), per-split loss with intervals (``ppl``), the
  temporal degradation report and gate (``temporal``), the unigram baseline (``unigram``), and
  where results go (``outputs``: atomic files, MLflow). Imports only ``trainer`` and ``pipeline``.
- ``generation/``: text out of a run: the MDM reverse process and ARM KV-cache sampling
  (``sampling``, ``kv_cache``), ``maskscale sample`` (``cli``), ``maskscale eval gen``
  (``gen``) and the harness's ``generate_until`` requests (``generate``). May import ``measure``.
- ``zeroshot/``: zero-shot benchmarks: the lm-evaluation-harness adapter (``harness``), local
  multiple-choice files (``tasks``), the temporal cloze task (``cloze``) and their commands
  ``maskscale eval harness | mc | cloze`` (``cli``). May import ``measure`` and ``generation``.
- ``studies/``: experiments built from the rooms above, one folder each and never importing
  each other: ``reversal/`` (``maskscale study reverse``) and ``scaling/`` (``maskscale sweep``,
  IsoFLOP plans, launches and fits).
- ``demo/``: ``maskscale demo``, the whole flow on the embedded corpus. Beside the studies.

``cli.py`` (this folder) holds the ``maskscale eval`` parsers; it imports nothing heavy and names
each command's module as a string, run when the command runs.
"""
