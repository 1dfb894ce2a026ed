"""The project's own error types: the failures a person has to fix, each with its exit status.

``sensord``'s command line turns one of these into a one-line message and the
sysexits status it carries. Anything else that escapes a command is a bug in
sensord, not bad input, and exits 70 (EX_SOFTWARE) with its traceback, so it is
never mistaken for a problem with the user's data or config.

The types that used to be plain ``ValueError`` still are (:class:`DataError`,
:class:`UsageError`), so existing ``except ValueError`` callers keep working.

>>> issubclass(DataError, ValueError), DataError("x").exit_status
(True, 65)
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CONFIG = 78


class SensordError(Exception):
    """A problem outside sensord's code (input, config, model, environment); ``str()`` says what to fix."""

    exit_status = EX_SOFTWARE
    kind = "error"  # the word the command line prints before the message


class UsageError(SensordError, ValueError):
    """A command-line argument is out of range (``--seeds 0``, ``--jobs 0``, ``--hop 99``)."""

    exit_status = EX_USAGE
    kind = "usage error"


class DataError(SensordError, ValueError):
    """A data file (or the data in it) cannot be used; the message names the file and the problem."""

    exit_status = EX_DATAERR
    kind = "data error"


class UnavailableError(SensordError):
    """Something sensord needs from the machine is not there (a free port, the mosquitto binary)."""

    exit_status = EX_UNAVAILABLE
    kind = "unavailable"
