"""The one error type a user can meet: a sentence that says what to do next.

The CLI prints its message on one line (no traceback) and exits with code 2;
the notebook shows the same message.
"""


class KdlabError(Exception):
    """A problem with the user's input, data, weights or checkpoints, not a bug."""
