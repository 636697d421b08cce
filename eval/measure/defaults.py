"""Defaults that several ``maskscale eval`` commands and their configs share.

Why a module of its own: the command-line parsers (``eval/cli.py``) show these numbers in
``--help`` and the measurement code (``PplConfig``) uses them when called from Python; both
import them from here, so neither depends on the other and ``--help`` imports nothing heavy.
"""

ROWS = 512
"""Rows sampled per split (0 = every row)."""
MC_SAMPLES = 128
"""MDM ELBO draws per row."""
SEED = 0
"""Seed of the row sample, the MC draws and the bootstrap."""
BATCH_SIZE = 8
"""Rows per forward pass."""
BOOTSTRAP = 1000
"""Bootstrap resamples behind each interval."""
MIN_DOCS = 5
"""Fewest documents a split needs for an interval (fewer: the loss alone, marked)."""
