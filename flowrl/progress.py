"""The live progress line of `flowrl run`, and Ctrl-C handling."""

from __future__ import annotations

import datetime
import signal
import threading
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def progress_line(name: str, r: dict[str, Any]) -> str:
    ret = r.get("episode_return_mean")
    ret_text = f"{ret:8.2f}" if ret is not None else "     n/a"
    evaluation = r.get("evaluation")
    eval_text = f" | eval {evaluation['episode_return_mean']:8.2f}" if isinstance(evaluation, dict) else ""
    return (f"{name} | iter {r['training_iteration']:5d} | steps {r['timesteps_total']:>10,} | return {ret_text}"
            f"{eval_text} | {r['env_steps_per_s']:>9,.0f} steps/s | {_clock(r['time_total_s'])}")


class Progress:
    """One live line on a terminal; on anything else a line every `every_s` seconds."""

    def __init__(self, stream: TextIO, quiet: bool, every_s: float = 10.0):
        self.stream, self.quiet, self.every_s = stream, quiet, every_s
        self.tty = stream.isatty()
        self.last = 0.0

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif time.monotonic() - self.last >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = time.monotonic()

    def finish(self, text: str) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()



class _GracefulInterrupt:
    """The first Ctrl-C asks the run to stop after the current iteration (checkpoint, clean
    close); a second one interrupts at once."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.requested = False
        self.forced = False
        self.previous = None

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        self.progress.finish("Ctrl-C: stopping after this iteration (Ctrl-C again to stop now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
