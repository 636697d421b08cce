"""The IsoFLOP scaling study (``maskscale sweep plan | run | fit``).

``plan`` writes a grid of run configs at FLOP-matched budgets (``prior`` spaces each budget's
sizes around a prior optimum), ``run`` trains them (local, Slurm or Ray; resumable), ``fit``
collects final losses and realised compute (or reads a table of points, ``table``) and
reports; ``laws`` holds the parabola/power-law fits, the bounds given where no optimum lies
within the sizes, and the ARM-vs-MDM compute gap; ``bootstrap`` the intervals over runs;
``report`` and ``figures`` write report.md and the plots; ``baseline`` the unigram baseline of
a sweep's corpus on its runs' validation rows; ``cli`` the parsers. May import
``eval.measure``, ``trainer`` and ``pipeline``.
"""
