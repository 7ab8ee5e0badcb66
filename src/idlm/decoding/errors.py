"""The one error type of decoding: a problem with a model, an adapter or a call, as one line.

Its own module so the light parts (the algorithm registry, request validation) can raise it
without importing the engine or torch.
"""


class DecodingError(ValueError):
    """A problem with a model, an adapter or a call, phrased as one line for the user."""
