"""The one error type for bad input: recipes, data files, model paths."""


class PeftbenchError(ValueError):
    """Bad user input. The message is one line naming the file, line and field."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format an input location as ``file:line: field 'x'``."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text
