"""Small utilities for starting real servers on private ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NeverReady(Exception):
    """Raised by a ``wait_until`` check that knows waiting longer cannot help (the process it
    waits for has exited): ``wait_until`` lets it through rather than waiting out its timeout."""


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except NeverReady:
            raise
        except Exception:  # a server still starting refuses connections: try again
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout} s")
