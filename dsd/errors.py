"""The one exception type for bad user input: its message is a single line saying which input, what is
wrong and what to do. The CLI prints it and exits with code 2; anything else is a bug. ``short_error`` quotes
another library's exception in such a line."""

__all__ = ["DsdError", "ExampleInputsError", "short_error"]


class DsdError(ValueError):
    pass


class ExampleInputsError(DsdError):
    """The model does not run on the inputs it was given (most often: inputs of another shape); the commands
    that take ``--input-size`` name it in the message."""


def short_error(error: BaseException) -> str:
    """Another library's exception as one short line, to quote in a DsdError: its type and its first sentence."""
    text = str(error).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}"[:200]
