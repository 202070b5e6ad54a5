"""A Plan runs a stream DAG one iteration at a time and returns a result record per iteration.

Counters are state owned by the plan (`PlanContext.counters`), handed to operators in
`setup(ctx)`; nothing is global or thread-local. The one place that decides when an iteration
ends is `Plan.step()`: it takes items from the output stream until the iteration's minimums
(`min_time_s`, `min_items`) are met, then builds the result.

>>> plan = Plan(Stream.from_iterable(range(10)).map(lambda x: x * x), min_items=2)
>>> result = plan.step()
>>> result["output"], result["training_iteration"], result["items_this_iter"]
(1, 1, 2)
>>> [r["output"] for r in plan.run(stop={"training_iteration": 3})]
[9, 25]
>>> plan.close()
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flowrl.executors import ActorSet, Executor, LocalExecutor
from flowrl.stream import PlanStructureError, Stream

STANDARD_COUNTERS = ("num_env_steps_sampled", "num_env_steps_trained", "num_episodes")


class Counters(collections.Counter):
    """Named integer counters, owned by one plan."""


class PlanContext:
    """What a running plan owns: executor, counters, opened iterators, threads, actor sets."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.counters = Counters({k: 0 for k in STANDARD_COUNTERS})
        self.info: dict[str, Any] = {}  # extra values an operator wants in the next result
        # (return, length) of the most recent finished episodes, for return/length means.
        self.episodes: collections.deque[tuple[float, int]] = collections.deque(maxlen=100)
        # Multi-agent: (return, length) of the agents' recent episodes, by the agents' policy.
        self.policy_episodes: collections.defaultdict[str, collections.deque[tuple[float, int]]] = \
            collections.defaultdict(lambda: collections.deque(maxlen=100))
        # Seconds spent inside each operator (by name) since the plan started.
        self.operator_time: dict[str, float] = {}
        self._opened: dict[int, Any] = {}
        self._threads: list[Any] = []
        self._actor_sets: list[ActorSet] = []
        self._lock = threading.RLock()  # opening a hub opens its upstream
        self.closed = False

    @classmethod
    def local(cls) -> "PlanContext":
        return cls(LocalExecutor())

    def open(self, stream: Stream) -> Iterator:
        """The running iterator of `stream`, created on first use. Only fan-out hubs may be
        opened twice; any other stream feeding two consumers is a structure error."""
        with self._lock:
            key = id(stream)
            if key in self._opened:
                if stream.shared:
                    return self._opened[key]
                raise PlanStructureError(
                    f"stream {stream.name!r} feeds two consumers; use .fan_out(n) to give each its own copy")
            it = stream._iterate(self)
            self._opened[key] = it
            return it

    def start_actors(self, actors: ActorSet) -> None:
        with self._lock:
            if actors not in self._actor_sets:
                actors.start(self.executor, self.counters)
                self._actor_sets.append(actors)

    def register_thread(self, pump: Any) -> None:
        with self._lock:
            self._threads.append(pump)

    @property
    def num_actor_restarts(self) -> int:
        return sum(a.num_restarts for a in self._actor_sets)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pump in self._threads:
            pump.stop.set()
        for pump in self._threads:
            pump.close()
        for it in list(self._opened.values()):
            close = getattr(it, "close", None)
            if callable(close):
                try:
                    close()
                except (Exception, GeneratorExit):
                    pass
        for actors in self._actor_sets:
            actors.close()
        self._threads.clear()
        self._actor_sets.clear()
        self._opened.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stop_reached(stop: Mapping[str, float] | Callable[[dict], bool] | None, result: dict) -> bool:
    if stop is None:
        return False
    if callable(stop):
        return bool(stop(result))
    return any(key in result and result[key] is not None and result[key] >= bound
               for key, bound in stop.items())


class Plan:
    """An output stream plus how to report on it: the unit a user builds, steps and closes.
    Closing it stops its threads and actors, and the executor too if starting this plan
    started it (a Ray instance it created).

    `report(item, ctx) -> dict` (or an operator with `setup(ctx)` and `__call__(item)`) adds
    its values to each result; without it a dict item is merged in and anything else (a
    SampleBatch included) is returned under "output". A plan started with no executor uses the local one.
    """

    def __init__(self, output: Stream, report: Any = None, executor: Executor | None = None,
                 min_time_s: float = 0.0, min_items: int = 1, min_env_steps: int = 0, name: str = "plan",
                 state: dict[str, Any] | None = None, steps_counter: str = "num_env_steps_sampled"):
        self.output = output
        self.report = report
        self.executor = executor
        self.min_time_s = min_time_s
        self.min_items = max(1, min_items)
        self.min_env_steps = min_env_steps
        self.steps_counter = steps_counter  # what min_env_steps counts (num_agent_steps_sampled: agent steps)
        self.name = name
        # Plan-specific values that must survive a checkpoint (an adaptive KL coefficient, say):
        # numbers and strings only, saved and restored with the counters.
        self.state: dict[str, Any] = state if state is not None else {}
        self.ctx: PlanContext | None = None
        self._it: Iterator | None = None
        self._iteration = 0
        self._time_total = 0.0
        self._owns_executor = False
        self._done = False

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Plan":
        if self.ctx is not None:
            return self
        if self.executor is None:
            self.executor = LocalExecutor()
        self._owns_executor = self.executor.start()
        self.ctx = PlanContext(self.executor)
        setup = getattr(self.report, "setup", None)
        if callable(setup):
            setup(self.ctx)
        self._it = self.ctx.open(self.output)
        return self

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
        self._it = None
        if self._owns_executor:
            self.executor.close()
            self._owns_executor = False

    def __enter__(self) -> "Plan":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- iterations -----------------------------------------------------------------------------
    @property
    def counters(self) -> Counters:
        self.start()
        return self.ctx.counters

    def step(self) -> dict[str, Any]:
        """Run one iteration and return its result record. Raises StopIteration when the output
        stream has ended. Any error closes the plan (actors, threads) before it propagates."""
        self.start()
        if self._done:
            raise StopIteration(f"plan {self.name!r} has no more items")
        t0 = time.perf_counter()
        items = 0
        item = None
        counters = self.ctx.counters
        steps_before, env_steps_before = counters[self.steps_counter], counters["num_env_steps_sampled"]
        time_before = dict(self.ctx.operator_time)
        try:
            while (items < self.min_items or time.perf_counter() - t0 < self.min_time_s
                   or counters[self.steps_counter] - steps_before < self.min_env_steps):
                try:
                    item = next(self._it)
                except StopIteration:
                    self._done = True
                    if items == 0:
                        raise
                    break
                items += 1
            extra = self._report(item)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise
        elapsed = time.perf_counter() - t0
        self._time_total += elapsed
        self._iteration += 1
        result: dict[str, Any] = {"training_iteration": self._iteration}
        result.update(self.ctx.counters)
        result["num_actor_restarts"] = self.ctx.num_actor_restarts
        result.update({"items_this_iter": items, "time_this_iter_s": elapsed, "time_total_s": self._time_total,
                       "env_steps_per_s": (counters["num_env_steps_sampled"] - env_steps_before) / max(elapsed, 1e-9)})
        result["operator_time_s"] = {name: spent - time_before.get(name, 0.0)
                                     for name, spent in self.ctx.operator_time.items()}
        result.update(self.ctx.info)
        self.ctx.info.clear()
        result.update(extra)
        return result

    def _report(self, item: Any) -> dict[str, Any]:
        if self.report is not None:
            if hasattr(self.report, "setup"):
                return dict(self.report(item))
            return dict(self.report(item, self.ctx))
        if type(item) is dict:
            return dict(item)
        return {"output": item}

    def run(self, stop: Mapping[str, float] | Callable[[dict], bool] | None = None,
            max_iterations: int | None = None) -> Iterator[dict[str, Any]]:
        """Step until a stop condition holds (a callable on the result, or a mapping of result
        key to bound where any key reaching its bound stops), the stream ends, or
        `max_iterations` is reached; yield each result."""
        count = 0
        while max_iterations is None or count < max_iterations:
            try:
                result = self.step()
            except StopIteration:
                return
            count += 1
            yield result
            if _stop_reached(stop, result):
                return

    # ---- checkpoints ---------------------------------------------------------------------------
    def progress_state(self) -> dict[str, Any]:
        """Counters, iteration, time, recent episodes and `state`, as JSON-able values."""
        self.start()
        return {"training_iteration": self._iteration, "time_total_s": self._time_total,
                "counters": dict(self.ctx.counters), "episodes": [list(e) for e in self.ctx.episodes],
                "policy_episodes": {p: [list(e) for e in eps] for p, eps in self.ctx.policy_episodes.items()},
                "state": dict(self.state)}

    def restore_progress(self, saved: dict[str, Any]) -> None:
        self.start()
        self._iteration = int(saved["training_iteration"])
        self._time_total = float(saved["time_total_s"])
        self.ctx.counters.update({k: int(v) - self.ctx.counters[k] for k, v in saved["counters"].items()})
        self.ctx.episodes.extend((float(r), int(n)) for r, n in saved["episodes"])
        for pid, episodes in saved.get("policy_episodes", {}).items():
            self.ctx.policy_episodes[pid].extend((float(r), int(n)) for r, n in episodes)
        self.state.update(saved["state"])

    # ---- composition ----------------------------------------------------------------------------
    def as_stream(self, name: str | None = None) -> Stream[dict[str, Any]]:
        """This plan's result records as a stream, to nest inside another plan. The inner plan
        keeps its own counters and is closed when the outer plan closes."""
        return _PlanSource(self, name or self.name)


class _PlanSource(Stream):
    def __init__(self, plan: Plan, name: str):
        super().__init__(name)
        self.plan = plan

    def _iterate(self, ctx: PlanContext):
        if self.plan.executor is None:
            self.plan.executor = ctx.executor
        try:
            yield from self.plan.run()
        finally:
            self.plan.close()
