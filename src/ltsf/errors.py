"""The one exception type for user mistakes: the CLI prints its message as a single line."""


class LTSFError(Exception):
    """A user-facing error: says what was wrong and what to do."""
