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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class local_cluster:
    """A Ray cluster of `num_nodes` nodes of `num_cpus` logical CPUs each on this machine
    (ray.cluster_utils.Cluster, each node its own raylet), for tests and benchmarks. Yields the
    Cluster (`address`, `head_node`, `worker_nodes`, `remove_node`); this process does not join
    it. Its address is not written to /tmp/ray/ray_current_cluster, where a plain `ray.init()`
    of any process on the machine would find and join it. Token authentication is on when a
    token is found locally, as for a head started with `ray start --head` (and as flowrl's join
    then expects). A node that goes away is seen dead within about 2 s. Everything it started
    ends on exit."""

    def __init__(self, num_nodes: int = 2, num_cpus: float = 2):
        self.num_nodes, self.num_cpus = num_nodes, num_cpus
        self.cluster = None
        self._auth_mode: str | None = None

    def __enter__(self):
        from unittest import mock

        import ray._private.utils
        from ray.cluster_utils import Cluster

        from flowrl.executors import local_auth_token

        if local_auth_token() is not None and "RAY_AUTH_MODE" not in os.environ:
            self._set_auth_mode("token")
        fast_health_checks = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                              "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
        try:
            with mock.patch.object(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None):
                self.cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": self.num_cpus, "gcs_server_port": free_port(), "include_dashboard": False,
                    "_system_config": fast_health_checks})
            for _ in range(self.num_nodes - 1):
                self.cluster.add_node(num_cpus=self.num_cpus)
        except BaseException:
            self.__exit__()
            raise
        return self.cluster

    def _set_auth_mode(self, mode: str | None) -> None:
        from ray._raylet import Config

        if mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            self._auth_mode = mode
            os.environ["RAY_AUTH_MODE"] = mode
        Config.initialize("")  # Ray caches its config; this reads the variable again

    def __exit__(self, *exc) -> None:
        if self.cluster is not None:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().gcs_address == self.cluster.address:
                ray.shutdown()  # this process joined it: leave before its nodes go
            self.cluster.shutdown()
            self.cluster = None
        if self._auth_mode is not None:
            self._set_auth_mode(None)
            self._auth_mode = None
