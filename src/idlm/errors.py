"""The error a stage reports to its user: what was wrong and how to fix it, in one line.

Its own module, importing nothing, so that model, data and serving code can raise it
without importing the stage runner (``idlm.stage``), which catches it.
"""


class StageError(RuntimeError):
    """A problem with a stage's inputs, phrased as one line that says how to fix it."""
