"""Studies: experiments that answer one question each, built from the rooms below.

One folder per study (``reversal/``, ``scaling/``). A study may import ``eval.measure``,
``eval.generation``, ``eval.zeroshot``, ``trainer`` and ``pipeline``; studies never import each
other or the demo, so one can be read, changed or deleted alone.
"""
