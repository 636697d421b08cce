"""The IsoFLOP scaling study (``maskscale sweep plan | run | fit``).

``plan`` writes a grid of run configs at FLOP-matched budgets, ``run`` trains them (local,
Slurm or Ray; resumable), ``fit`` collects final losses and reports, ``laws`` holds the
parabola/power-law fits and the ARM-vs-MDM compute gap, ``baseline`` the unigram baseline of a
sweep's corpus on its runs' validation rows; ``cli`` the parsers. May import ``eval.measure``,
``trainer`` and ``pipeline``.
"""
