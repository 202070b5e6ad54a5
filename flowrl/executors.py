"""Executors run a plan's actors: in the calling process (local) or as Ray actors (ray).

A plan never names its executor; the same plan runs on either, chosen by configuration
(`make_executor("local")` / `make_executor("ray", num_cpus=2)`). An `ActorSet` describes N
actors of one class; it starts when a plan that uses it starts, on that plan's executor.

>>> class Counter:
...     def __init__(self, start=0):
...         self.n = start
...     def next(self):
...         self.n += 1
...         return self.n
>>> from flowrl.plan import Plan
>>> counters = ActorSet(Counter, num_actors=2, kwargs={"start": 10})
>>> with Plan(from_actors(counters, "next")) as plan:   # local executor by default
...     [plan.step()["output"] for _ in range(4)]
[11, 11, 12, 12]
"""

from __future__ import annotations

import collections
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from flowrl.stream import OperatorError, Stream

if TYPE_CHECKING:
    from flowrl.plan import PlanContext


class ActorDiedError(RuntimeError):
    """An actor's process is gone; the actor set replaces it."""


class ActorRestartLimitError(RuntimeError):
    """An actor set replaced more dead actors than its `max_restarts` allows."""


# ---- executors -------------------------------------------------------------------------------
class Executor:
    name = "executor"
    concurrent = False  # whether several things may make progress at once (threads, actors)

    def start(self) -> bool:
        """Make the executor ready; True when this call started something `close()` must end."""
        return False

    def close(self) -> None: ...

    def create_actor(self, cls: type, args: tuple, kwargs: dict, num_cpus: float) -> Any:
        raise NotImplementedError

    def submit(self, handle: Any, method: str, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def put(self, value: Any) -> Any:
        """`value` stored once for many calls (Ray's object store); locally, the value itself."""
        return value

    def wait(self, refs: list, timeout: float) -> list:
        """Some of `refs` that are ready (at least one unless `timeout` passed)."""
        raise NotImplementedError

    def get(self, ref: Any) -> Any:
        """The result of a call; raises `ActorDiedError` if the actor died."""
        raise NotImplementedError

    def kill(self, handle: Any, wait: bool = False) -> None:
        """End an actor; with `wait`, return only once it is seen dead."""
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()


class _LocalActor:
    def __init__(self, instance: Any):
        self.instance = instance
        self.dead = False
        # Like a Ray actor, one call at a time (a learner thread may call while the driver does).
        self.lock = threading.Lock()


class _LocalCall:
    """A call on a local actor, run when its result is asked for, so nothing runs ahead of
    the consumer and the order of calls is deterministic."""

    __slots__ = ("actor", "method", "args", "kwargs")

    def __init__(self, actor: _LocalActor, method: str, args: tuple, kwargs: dict):
        self.actor, self.method, self.args, self.kwargs = actor, method, args, kwargs


class LocalExecutor(Executor):
    """Everything in the calling process, deterministic, no Ray."""

    name = "local"

    def create_actor(self, cls, args, kwargs, num_cpus):
        return _LocalActor(cls(*args, **kwargs))

    def submit(self, handle, method, args, kwargs):
        return _LocalCall(handle, method, args, kwargs)

    def wait(self, refs, timeout):
        return refs[:1]

    def get(self, ref: _LocalCall):
        if ref.actor.dead:
            raise ActorDiedError("local actor was killed")
        with ref.actor.lock:
            return getattr(ref.actor.instance, ref.method)(*ref.args, **ref.kwargs)

    def kill(self, handle: _LocalActor, wait: bool = False):
        handle.dead = True
        close = getattr(handle.instance, "close", None)
        if callable(close):
            close()


class RayExecutor(Executor):
    """Actors are Ray actors. Joins the cluster at `address` when given (or one already
    initialized in this process); otherwise starts a local Ray with `num_cpus` and no dashboard,
    and shuts it down on `close()`."""

    name = "ray"
    concurrent = True

    def __init__(self, num_cpus: int | None = None, address: str | None = None, quiet: bool = True):
        self.num_cpus = num_cpus
        self.address = address
        self.quiet = quiet
        self._started_ray = False

    def start(self) -> bool:
        import ray

        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if not self.address:
            # A Ray started here has no dashboard to show task events or metrics; collecting them
            # costs every worker process CPU (about 2-3% of sampling throughput on 2 cores). Set
            # these variables yourself to keep them (or to change any default below).
            os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
            os.environ.setdefault("RAY_enable_metrics_collection", "0")
            # Sampled batches (a few hundred KB) come back inside the actor's reply rather than
            # through the object store, which saves the raylet work per batch (~5% throughput).
            os.environ.setdefault("RAY_max_direct_call_object_size", str(2 * 1024 * 1024))
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR",
                                  "log_to_driver": not self.quiet}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs["num_cpus"] = self.num_cpus or os.cpu_count()
        ray.init(**kwargs)
        self._started_ray = True
        return True

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def create_actor(self, cls, args, kwargs, num_cpus):
        import ray

        available = ray.cluster_resources().get("CPU", 0)
        if num_cpus > available:
            raise ValueError(f"an actor of {cls.__name__} asks for {num_cpus} CPUs but the Ray cluster has "
                             f"{available:g}; lower num_cpus_per_actor or add nodes")
        remote_cls = ray.remote(cls) if not hasattr(cls, "remote") else cls
        return remote_cls.options(num_cpus=num_cpus, max_restarts=0, max_task_retries=0).remote(*args, **kwargs)

    def submit(self, handle, method, args, kwargs):
        return getattr(handle, method).remote(*args, **kwargs)

    def put(self, value):
        import ray

        return ray.put(value)

    def wait(self, refs, timeout):
        import ray

        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=True)
        return ready

    def get(self, ref):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayActorError as e:
            raise ActorDiedError(str(e).splitlines()[0]) from None
        except RayTaskError as e:
            # Re-raise the remote exception as its own type; its text carries the remote traceback.
            raise e.as_instanceof_cause() from None

    def kill(self, handle, wait: bool = False):
        import ray
        from ray.exceptions import RayActorError

        ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + 10
        while wait and time.monotonic() < deadline:  # ray.kill lands asynchronously
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=1)
            except RayActorError:
                return
            except ray.exceptions.GetTimeoutError:
                continue
            time.sleep(0.02)


def make_executor(kind: str = "local", **kwargs: Any) -> Executor:
    """An executor by name: "local" or "ray" (kwargs: num_cpus, address)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(**kwargs)
    raise ValueError(f"unknown executor {kind!r}; choose 'local' or 'ray'")


# ---- actor sets ------------------------------------------------------------------------------
class ActorSet:
    """`num_actors` actors of class `cls`, started on the plan's executor when the plan starts.

    If `cls.__init__` takes an `actor_index` argument it receives `index_offset` + 0..N-1 (for
    seeding). A dead
    actor is replaced by a new one built with the same arguments, at most `max_restarts` times
    in all; `on_replace` callbacks then run with the index (to resend weights, say), and
    `on_start` callbacks run once the actors are created.
    """

    def __init__(self, cls: type, num_actors: int, args: Sequence = (), kwargs: dict | None = None,
                 name: str | None = None, max_restarts: int = 3, num_cpus_per_actor: float = 1.0,
                 index_offset: int = 0):
        if num_actors < 0:
            raise ValueError("num_actors must be >= 0")
        self.cls = cls
        self.num_actors = num_actors
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.name = name or cls.__name__
        self.max_restarts = max_restarts
        self.num_cpus_per_actor = num_cpus_per_actor
        self.index_offset = index_offset
        self.num_restarts = 0
        self.on_replace: list[Callable[[int], None]] = []
        self.on_start: list[Callable[[], None]] = []
        self._executor: Executor | None = None
        self._handles: list[Any] = []
        init = getattr(cls, "__init__", None)
        try:
            self._pass_index = init is not None and "actor_index" in inspect.signature(init).parameters
        except (TypeError, ValueError):
            self._pass_index = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, executor: Executor) -> None:
        if self._executor is executor:
            return
        if self._executor is not None:
            raise RuntimeError(f"actor set {self.name!r} is already running on another plan")
        self._executor = executor
        self._handles = [self._create(i) for i in range(self.num_actors)]
        for callback in self.on_start:
            callback()

    def _create(self, index: int) -> Any:
        kwargs = dict(self.kwargs, actor_index=index + self.index_offset) if self._pass_index else self.kwargs
        return self._executor.create_actor(self.cls, self.args, kwargs, self.num_cpus_per_actor)

    @property
    def started(self) -> bool:
        return self._executor is not None

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            raise RuntimeError(f"actor set {self.name!r} has not started; start the plan that uses it first")
        return self._executor

    def close(self) -> None:
        if self._executor is None:
            return
        for handle in self._handles:
            try:
                self._executor.kill(handle)
            except Exception:
                pass
        self._handles = []
        self._executor = None

    def __len__(self) -> int:
        return self.num_actors

    # ---- calls --------------------------------------------------------------------------------
    def submit(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.executor.submit(self._handles[index], method, args, kwargs)

    def get(self, index: int, ref: Any, method: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """The result of `ref`; when the actor died, replace it and call `method` again."""
        while True:
            try:
                return self.executor.get(ref)
            except ActorDiedError:
                self.replace(index)
                ref = self.submit(index, method, *args, **(kwargs or {}))

    def foreach(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every actor and wait for all results, in actor order."""
        refs = [self.submit(i, method, *args, **kwargs) for i in range(self.num_actors)]
        return [self.get(i, ref, method, args, kwargs) for i, ref in enumerate(refs)]

    def foreach_async(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call `method` on every actor without waiting for the results (on the local executor,
        where calls run when their result is asked for, they run now)."""
        if not self.executor.concurrent:
            self.foreach(method, *args, **kwargs)
            return
        for i in range(self.num_actors):
            self.submit(i, method, *args, **kwargs)

    def replace(self, index: int) -> None:
        if self.num_restarts >= self.max_restarts:
            raise ActorRestartLimitError(
                f"actor set {self.name!r}: actor {index} died and {self.num_restarts} restarts already "
                f"reached max_restarts={self.max_restarts}")
        try:
            self.executor.kill(self._handles[index])
        except Exception:
            pass
        self.num_restarts += 1
        self._handles[index] = self._create(index)
        for callback in self.on_replace:
            callback(index)

    def kill(self, index: int) -> None:
        """Kill actor `index` (its process, on Ray). The next call on it finds it dead and
        replaces it. For fault-tolerance tests; returns once the actor is dead."""
        self.executor.kill(self._handles[index], wait=True)


# ---- sources over actors ---------------------------------------------------------------------
def from_actors(actors: ActorSet, method: str, *args: Any, max_in_flight: int = 2,
                name: str | None = None, **kwargs: Any) -> Stream:
    """Call `actors.<method>(*args)` again and again, yielding each result as it arrives.

    Each actor has at most `max_in_flight` calls outstanding; a new call is sent only when the
    consumer takes a result, so a slow consumer pauses the actors. On the local executor the
    actors are called in turn (round robin), one call at a time, deterministically.
    """
    return _ActorSource(actors, method, args, kwargs, max_in_flight, name or f"{actors.name}.{method}",
                        gather=False)


def gather_sync(actors: ActorSet, method: str, *args: Any, name: str | None = None,
                **kwargs: Any) -> Stream[list]:
    """Call `method` on every actor at once and yield the list of results, in actor order, once
    all have answered (lock-step)."""
    return _ActorSource(actors, method, args, kwargs, 1, name or f"{actors.name}.{method}[sync]", gather=True)


class _ActorSource(Stream):
    def __init__(self, actors: ActorSet, method: str, args: tuple, kwargs: dict, max_in_flight: int,
                 name: str, gather: bool):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        super().__init__(name)
        self.actors, self.method, self.args, self.kwargs = actors, method, args, kwargs
        self.max_in_flight = max_in_flight
        self.gather = gather

    def _iterate(self, ctx: "PlanContext") -> Iterator:
        ctx.start_actors(self.actors)
        try:
            if self.gather:
                yield from self._gather()
            elif not ctx.executor.concurrent:
                yield from self._round_robin()
            else:
                yield from self._as_ready(ctx)
        except (OperatorError, ActorRestartLimitError):
            raise
        except Exception as e:
            raise OperatorError(self.name, e) from e

    def _call(self, index: int) -> Any:
        return self.actors.submit(index, self.method, *self.args, **self.kwargs)

    def _result(self, index: int, ref: Any) -> Any:
        return self.actors.get(index, ref, self.method, self.args, self.kwargs)

    def _gather(self):
        while True:
            yield self.actors.foreach(self.method, *self.args, **self.kwargs)

    def _round_robin(self):
        while True:
            for i in range(self.actors.num_actors):
                yield self._result(i, self._call(i))

    def _as_ready(self, ctx):
        executor = self.actors.executor
        # An actor runs its calls in order, so when any of its calls is ready its oldest one is
        # too: taking that one keeps each actor's items in order.
        pending = [collections.deque() for _ in range(self.actors.num_actors)]
        owner: dict[Any, int] = {}

        def call(index: int) -> None:
            ref = self._call(index)
            pending[index].append(ref)
            owner[ref] = index

        for _ in range(self.max_in_flight):
            for i in range(self.actors.num_actors):
                call(i)
        while owner:
            ready = executor.wait(list(owner), timeout=0.2)  # a timeout keeps Ctrl-C responsive
            if not ready:
                continue
            index = owner[ready[0]]
            ref = pending[index].popleft()
            del owner[ref]
            try:
                item = executor.get(ref)
            except ActorDiedError:
                # Every call still in flight on the dead actor fails too; drop them all.
                for other in pending[index]:
                    del owner[other]
                pending[index].clear()
                self.actors.replace(index)
                for _ in range(self.max_in_flight):
                    call(index)
                continue
            yield item
            # Only now, with the item taken by the consumer, ask this actor for another.
            call(index)
