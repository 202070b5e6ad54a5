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
    # A plan with a replay buffer says what its columns take in its first result.
    memory = r.get("replay_buffer_bytes")
    memory_text = f" | replay buffer {memory / 1e6:,.1f} MB" if memory is not None else ""
    # A plan fed by external clients (input: external) says where its policy server listens.
    address = r.get("external_address")
    address_text = f" | serving clients at {address}" if address else ""
    return (f"{name} | iter {r['training_iteration']:5d} | steps {r['timesteps_total']:>10,} | return {ret_text}"
            f"{eval_text} | {r['env_steps_per_s']:>9,.0f} steps/s | {_clock(r['time_total_s'])}{memory_text}"
            f"{address_text}")


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
    """Once `armed` (an iteration has ended), the first Ctrl-C asks the run to stop after the
    current iteration (checkpoint, clean close) and a second one interrupts at once. Before
    that there is nothing to save, and waiting could mean waiting on actors that never start:
    the first Ctrl-C interrupts at once."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.requested = False
        self.forced = False
        self.armed = False
        self.previous = None

    def _handle(self, signum, frame):
        if self.requested or not self.armed:
            self.forced = self.requested
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
