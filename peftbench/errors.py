"""The error types of expected failures: bad input, and a run that diverged."""


class PeftbenchError(ValueError):
    """Bad user input. The message is one line naming the file, line and field."""


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss, parameter or logit. The message starts with ``diverged:``."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format an input location as ``file:line: field 'x'``."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text
