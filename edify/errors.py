"""The one exception type for bad user input; the CLI prints it as one line."""


class EdifyError(ValueError):
    """Bad input or configuration: a one-line, actionable message."""
