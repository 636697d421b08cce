"""``maskscale demo``: the whole flow on the embedded State of the Union corpus, on a CPU.

``run`` registers the command and runs its stages (corpus, side-by-side training, ppl,
temporal report, cloze, samples), ``train`` the two training processes, ``config`` the settings
read from ``configs/demo.yaml``, ``summary`` the closing table. The demo sits at the top of the
house: it may import every room of ``eval/`` except the studies, ``trainer`` and ``pipeline``.
"""
