"""Errors in what the user gave (a config, a data file, a reward file, a model path).

The command line prints one of these as a single message that names the file, key, row or line and says what
to do, and exits 2 without a traceback (`--debug`, or GRPO_DEBUG=1, shows it). Anything else is a bug or a
failure of the run and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; its message says where and how to fix it."""
