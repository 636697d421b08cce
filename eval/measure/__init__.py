"""The measurement core: how well a trained run predicts text, with honest intervals.

Holds model/corpus loading (``loading``), the row sample (``rows``), batched scoring and the
likelihood estimators (``packing``, ``plans``, ``likelihood``), ``maskscale eval ppl`` (``ppl``) and
``maskscale eval temporal`` (``temporal``), the unigram baseline (``unigram``), shared command
defaults (``defaults``) and result writing (``outputs``). Every other room of ``eval/`` builds
on it; it imports only ``trainer`` and ``pipeline``, never another room of ``eval/``.
"""
