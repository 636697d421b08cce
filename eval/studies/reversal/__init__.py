"""The reversal-curse study (``maskscale study reverse``; paper-notes.md, claim 5).

``data`` writes Berglund et al.'s layout from fictitious people, ``study`` fine-tunes both
families and samples every test prompt, ``score`` scores answers (contained, BLEU) and draws
the table and plot, ``choice`` ranks every candidate answer by likelihood against chance.
May import ``eval.measure``, ``eval.generation``, ``trainer`` and ``pipeline``.
"""
