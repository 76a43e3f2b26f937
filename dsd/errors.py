"""The one exception type for bad user input: its message is a single line saying which input, what is
wrong and what to do. The CLI prints it and exits with code 2; anything else is a bug."""

__all__ = ["DsdError"]


class DsdError(ValueError):
    pass
