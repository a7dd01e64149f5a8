"""The error types of expected failures: bad input, a run that diverged, and a run cut short from outside."""


class PeftbenchError(ValueError):
    """Bad user input. The message is one line naming the file, line and field."""


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss, parameter or logit. The message starts with ``diverged:``."""


class MainProcessFailed(RuntimeError):
    """The main process's run failed while this process waited for its solo work: the run fails here too, and a
    sweep goes on to its next cell with every process."""


class Interrupted(RuntimeError):
    """The run was cut short from outside (a signal, a lost process): its failed record says so, and a sweep
    stops and runs the cell again when resumed."""


class Stopped(Interrupted):
    """A stop signal (SIGTERM: a launcher stopping every process because one failed, a scheduler ending a job)."""


class LostProcess(Interrupted):
    """Another process of the group died, or did not answer within ``train.dist_timeout``."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format an input location as ``file:line: field 'x'``."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text


QUOTE_LIMIT = 300  # characters of a value quoted in an error line


def clip(text, limit: int = QUOTE_LIMIT) -> str:
    """``text`` (any value's ``str``/``repr``) cut to ``limit`` characters, saying how long it was: an error line
    quotes what it was given, never megabytes of it (and never a character that cannot be written out)."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate cannot be printed
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


LINE_LIMIT = 1000  # characters of an error line, whatever it quotes


def one_line(message) -> str:
    """An error message as one line of at most ``LINE_LIMIT`` characters (what the command line prints)."""
    return clip(" ".join(str(message).split("\n")), LINE_LIMIT)
