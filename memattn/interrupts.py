"""Ctrl-C as a request: a long job finishes the unit of work in hand, keeps it, then stops.

The first SIGINT sets :attr:`StopRequest.requested` (the job checks it between units: a training
step, a batch) and says so on stderr; a second one interrupts at once, as Ctrl-C always does. Outside
the main thread (where Python cannot install signal handlers) Ctrl-C keeps its usual meaning.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any


class StopRequest:
    """Context manager: ``with StopRequest("finishing step; a checkpoint follows") as stop: ...``."""

    def __init__(self, notice: str) -> None:
        self.notice = notice
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write(f"\nCtrl-C: {self.notice} (Ctrl-C again to stop now)\n")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
