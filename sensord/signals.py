"""Signal handlers installed first thing in ``sensord run``, before anything slow is imported or loaded.

Until the daemon runs, SIGTERM/SIGINT/SIGHUP are only remembered here (a SIGHUP with the default handler
would kill the process, and ``Restart=on-failure`` does not bring back a process killed by SIGHUP);
:meth:`sensord.daemon.Daemon.install_signal_handlers` takes them over. Standard library only.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

stop_requested = threading.Event()
reload_requested = threading.Event()


def _stop(signum: int, frame: FrameType | None) -> None:
    stop_requested.set()


def _reload(signum: int, frame: FrameType | None) -> None:
    reload_requested.set()


def install_early() -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
