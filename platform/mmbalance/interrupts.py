"""Count Ctrl-C presses as they happen, so that a second one always stops a search.

Why not a plain Python SIGINT handler (which is what Ray Tune installs): CPython runs Python
signal handlers only when the main thread executes bytecode. While it waits inside a C call
(``ray.wait``, a gloo collective, a slow ``pickle``) two presses half a second apart reach the
handler as *one* call, and the search then ends gracefully (saving state, finishing W&B runs)
as if the second press never happened. The C-level handler, however, writes one byte per
signal to the wakeup fd at the moment the signal arrives. A watcher thread reading that fd
sees every press:

- first press: ``on_first`` is called (for a search: ask Tune for its graceful stop);
- second press: the main thread gets ``KeyboardInterrupt`` as soon as it runs Python again,
  and if the process is still alive ``grace_s`` later (stuck in C, or in a slow shutdown), it
  exits 130 without cleanup, printing ``message`` if the main thread never got to;
- a third press exits at once.

``interrupted`` tells the caller afterwards whether a press arrived, which is what says a
search was stopped: counting ended trials cannot, because Tune marks the trials it stops
as terminated.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import TracebackType

INTERRUPTED_EXIT = 130


class CountedInterrupts:
    """Context manager: while active, SIGINT is counted by a watcher thread (see module doc).

    Must be entered from the main thread (``signal.set_wakeup_fd`` requires it); elsewhere it
    does nothing and ``interrupted`` stays False."""

    def __init__(self, on_first=None, *, grace_s: float = 5.0, message: str = "interrupted"):
        self.on_first = on_first
        self.grace_s = grace_s
        self.message = message
        self.presses = 0
        self._active = False
        self._handled = 0  # presses the main-thread handler has already acted on

    @property
    def interrupted(self) -> bool:
        return self.presses > 0

    def __enter__(self) -> "CountedInterrupts":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self._active = True
        self._watcher = threading.Thread(target=self._watch, name="sigint-counter", daemon=True)
        self._watcher.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if not self._active:
            return
        self._active = False
        signal.signal(signal.SIGINT, self._previous_handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # ends the watcher's read
        self._watcher.join(timeout=1.0)
        os.close(self._read)

    # Runs later, in the main thread, once per batch of presses that arrived while the main
    # thread was busy. The C handler wrote one byte per press before this runs; the watcher
    # thread may not have read them yet, so wait (briefly) until it has counted a new one.
    def _on_sigint(self, signum: int, frame) -> None:
        deadline = time.monotonic() + 0.5
        while self.presses <= self._handled and time.monotonic() < deadline:
            time.sleep(0.005)
        self._handled = max(self.presses, self._handled + 1)
        if self._handled >= 2:
            raise KeyboardInterrupt

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            for byte in data:
                if byte == signal.SIGINT and self._active:
                    self._count()

    def _count(self) -> None:
        self.presses += 1  # only this thread writes it
        presses = self.presses
        if presses == 1 and self.on_first is not None:
            self.on_first()
        elif presses == 2:
            timer = threading.Timer(self.grace_s, self._exit_now)
            timer.daemon = True
            timer.start()
        elif presses >= 3:
            self._exit_now()

    def _exit_now(self) -> None:
        # Armed by a second press, it also ends a process whose exit hangs after the main thread
        # left the block (a Ray shutdown waiting on a dead node); the message then was printed.
        try:
            if self._active:  # os.write: the main thread may hold sys.stderr's lock
                os.write(sys.stderr.fileno(), (self.message + "\n").encode())
        finally:
            os._exit(INTERRUPTED_EXIT)
