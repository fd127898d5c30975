"""The old name of runlib.py, for bench.py only until it imports runlib (issue 19): the three names
it uses. Nothing else imports this file; delete it with bench.py's `import training`."""

import contextlib

from runlib import ERRORS, ArgumentParser, exit_with  # noqa: F401


class TrainingFailed(Exception):
    """A run that cannot go on; its message is the line exit_with prints."""


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except (TrainingFailed, *ERRORS) as e:
        exit_with(e, "bench.py")
