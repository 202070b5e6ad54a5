"""Test sources and helpers: actors that count what they produce, fail or die on demand.

They live in the package (not in tests/) so that Ray workers can import them.
"""

from __future__ import annotations

import os
import threading
import time


class CountingSource:
    """An actor whose `next()` returns (actor_index, n) for n = 1, 2, ...; `produced()` says
    how many items it has made so far."""

    def __init__(self, actor_index: int = 0, delay_s: float = 0.0, fail_at: int | None = None,
                 exit_at: int | None = None):
        self.index = actor_index
        self.n = 0
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.exit_at = exit_at

    def next(self) -> tuple[int, int]:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.n += 1
        if self.fail_at is not None and self.n == self.fail_at:
            raise ValueError(f"source {self.index} fails at item {self.n}")
        if self.exit_at is not None and self.n == self.exit_at:
            os._exit(1)  # a crash: the actor's process dies without cleanup
        return (self.index, self.n)

    def produced(self) -> int:
        return self.n


def flowrl_threads() -> list[threading.Thread]:
    """Threads started by flowrl that are still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("flowrl:") and t.is_alive()]


def alive_ray_actors(class_name: str | None = None) -> list[str]:
    """Ids of Ray actors that are not dead (optionally only those of one class)."""
    import ray._private.state as state

    return [actor_id for actor_id, info in state.actors().items()
            if info["State"] != "DEAD" and (class_name is None or info.get("ActorClassName", "").endswith(class_name))]


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def same_experience(a, b) -> bool:
    """Whether two SampleBatches hold the same steps: equal columns, with `eps_id` equal up
    to naming (each worker instance draws a random base for its episode ids)."""
    import numpy as np

    def labels(ids):  # episodes numbered in order of first appearance
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        return np.argsort(np.argsort(first))[inverse.reshape(-1)]

    others = [c for c in a.columns if c != "eps_id"]
    return (a.columns == b.columns and a.select(others) == b.select(others)
            and ("eps_id" not in a.columns or np.array_equal(labels(a["eps_id"]), labels(b["eps_id"]))))


def ctrl_c(proc, timeout_s: float = 30.0) -> tuple[str, float]:
    """Send SIGINT to a subprocess (started with text pipes) and wait for it to end: its
    remaining stderr (or stdout, when stderr is not a pipe) and the seconds it took to stop."""
    import signal

    t0 = time.monotonic()
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        proc.kill()
    return (err if err is not None else out), time.monotonic() - t0
