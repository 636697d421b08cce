"""The reversal-curse study (``maskscale study reverse``; paper-notes.md, claim 5).

``data`` writes Berglund et al.'s layout from fictitious people, ``config`` holds the study's
settings, ``finetune`` runs (skips, resumes, extends or refuses) each family's fine-tune,
``study`` samples every test prompt and writes the report, ``score`` scores answers (contained,
BLEU) and draws the table and plot, ``choice`` ranks every candidate answer by likelihood
against chance.
May import ``eval.measure``, ``eval.generation``, ``trainer`` and ``pipeline``.
"""
