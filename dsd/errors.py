"""The one exception type for bad user input: its message is a single line saying which input, what is
wrong and what to do. The CLI prints it and exits with code 2; anything else is a bug."""

__all__ = ["DsdError", "ExampleInputsError"]


class DsdError(ValueError):
    pass


class ExampleInputsError(DsdError):
    """The model does not run on the inputs it was given (most often: inputs of another shape); the commands
    that take ``--input-size`` name it in the message."""
