"""Operators that run streams side by side: Concurrently (round robin, optionally weighted, or
as ready), and a learner thread fed through a bounded queue (LearnerQueue, Enqueue, Dequeue)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

from flowrl.stream import Map, Order, PlanStructureError, Stream, union


def Concurrently(streams: dict[str, Stream], output: str | list[str], order: Order = Order.ROUND_ROBIN,
                 round_robin_weights: Mapping[str, int | float | Fraction] | None = None,
                 name: str = "Concurrently") -> Stream:
    """Runs the named streams together and yields the items of the stream(s) named `output`;
    the others run for their side effects. Round robin takes one item from each in turn
    (here: a, 0, b, 1, c).

    >>> from flowrl.plan import Plan
    >>> seen = []
    >>> side = Stream.from_iterable(range(100)).map(seen.append, name="side")
    >>> main = Stream.from_iterable("abc")
    >>> with Plan(Concurrently({"main": main, "side": side}, output="main")) as plan:
    ...     [plan.step()["output"] for _ in range(3)], len(seen)
    (['a', 'b', 'c'], 2)

    `round_robin_weights` says how many items to take from each stream per round (default 1):
    {"store": 1, "train": 4} trains four replayed batches per stored one. A fraction is kept
    as credit, so the long-run ratio is exact: {"store": 1, "train": 0.25} trains once every
    fourth stored batch (see flowrl.operators.replay.weights_for_training_intensity).

    >>> stored = []
    >>> store = Stream.from_iterable(range(100)).map(stored.append, name="store")
    >>> train = Stream.from_iterable(range(1000))
    >>> weights = {"store": 1, "train": Fraction(5, 2)}   # 2, 3, 2, 3, ... per stored item
    >>> with Plan(Concurrently({"store": store, "train": train}, "train", round_robin_weights=weights)) as plan:
    ...     _ = [plan.step() for _ in range(10)]
    >>> len(stored)
    4

    A stream with a node that has a `ready()` method (Replay before `learning_starts`) is
    skipped while that says False, so it never blocks the others in the same thread; the
    round robin waits only when no stream is ready. With `Order.AS_READY` on an executor that
    runs streams concurrently (Ray) each stream runs in its own thread and items come as they
    are ready; weights need `Order.ROUND_ROBIN`. On the local executor AS_READY is round robin.
    """
    outputs = [output] if isinstance(output, str) else list(output)
    unknown = [o for o in outputs if o not in streams]
    if unknown:
        raise ValueError(f"Concurrently: output {unknown} is not one of the streams {sorted(streams)}")
    weights = {key: Fraction(1) for key in streams}
    if round_robin_weights is not None:
        if order is not Order.ROUND_ROBIN:
            raise ValueError("Concurrently: round_robin_weights need order=Order.ROUND_ROBIN")
        unknown = [k for k in round_robin_weights if k not in streams]
        if unknown:
            raise ValueError(f"Concurrently: round_robin_weights for {unknown}, which are not among the streams "
                             f"{sorted(streams)}")
        for key, w in round_robin_weights.items():
            w = as_fraction(w)
            if not w > 0:
                raise ValueError(f"Concurrently: round_robin_weights[{key!r}] must be > 0, "
                                 f"got {round_robin_weights[key]}")
            weights[key] = w
    return _Concurrently(streams, outputs, order, weights, name)


def as_fraction(value: int | float | Fraction) -> Fraction:
    """An exact weight; a float becomes the decimal it prints as (0.1 -> 1/10), the number the
    user wrote, not its binary approximation."""
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def _gates(stream: Stream) -> list[Any]:
    return [node for node in stream.walk() if callable(getattr(node, "ready", None))]


class _Concurrently(Stream):
    def __init__(self, streams: dict[str, Stream], outputs: list[str], order: Order,
                 weights: dict[str, Fraction], name: str):
        super().__init__(name, tuple(streams.values()))
        self.keys, self.outputs, self.order, self.weights = list(streams), outputs, order, weights
        self.gates = [_gates(s) for s in streams.values()]

    def _iterate(self, ctx):
        if self.order is Order.AS_READY and ctx.executor.concurrent:
            yield from self._as_ready(ctx)
            return
        live = []
        for key, stream, gates in zip(self.keys, self.upstreams, self.gates):
            live.append([key, ctx.open(stream), self.weights[key], Fraction(0), gates, key in self.outputs])
        ended = []
        while live:
            any_ready = False
            for entry in list(live):
                key, it, weight, credit, gates, is_output = entry
                if gates and not all(g.ready() for g in gates):
                    continue  # it gains no credit while it waits: no burst of items once ready
                any_ready = True
                credit += weight
                take = int(credit)
                entry[3] = credit - take
                for _ in range(take):
                    try:
                        item = next(it)
                    except StopIteration:
                        live.remove(entry)
                        ended.append(key)
                        break
                    if is_output:
                        yield item
            if not any_ready and live:
                if ended:
                    raise PlanStructureError(
                        f"{self.name}: {ended} ended while {[e[0] for e in live]} still wait to be ready "
                        "(a Replay stream whose buffer never reached learning_starts rows)")
                time.sleep(0.01)  # only rows added by another thread can make them ready

    def _as_ready(self, ctx):
        tagged = [s.map(lambda item, key=key: (key, item), name=f"{self.name}[{key}]")
                  for key, s in zip(self.keys, self.upstreams)]
        for key, item in ctx.open(union(*tagged, order=Order.AS_READY, name=self.name)):
            if key in self.outputs:
                yield item


class LearnerQueue:
    """A bounded queue between the sampling side of a plan and a learner thread."""

    def __init__(self, maxsize: int = 4):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.maxsize = maxsize

    def qsize(self) -> int:
        return self.queue.qsize()


class Enqueue(Map):
    """Puts each item into a LearnerQueue, waiting while it is full (so a slow learner slows
    sampling down), and passes it on.

    >>> q = LearnerQueue(2)
    >>> Enqueue(q)("batch"), q.qsize()
    ('batch', 1)
    """

    def __init__(self, learner_queue: LearnerQueue):
        self.learner_queue = learner_queue
        self.ctx = None

    def setup(self, ctx) -> None:
        self.ctx = ctx

    def __call__(self, item: Any) -> Any:
        while True:
            try:
                self.learner_queue.queue.put(item, timeout=0.1)  # a timeout keeps Ctrl-C responsive
                return item
            except queue.Full:
                if self.ctx is not None and self.ctx.closed:  # the plan is closing and nobody will take it
                    return item


def Dequeue(learner_queue: LearnerQueue, name: str = "Dequeue") -> Stream:
    """A stream of the items put into `learner_queue`, for the learner thread.

    >>> q = LearnerQueue(2); _ = Enqueue(q)(1); _ = Enqueue(q)(2)
    >>> from flowrl.stream import take
    >>> take(Dequeue(q), 2)
    [1, 2]
    """

    return _Dequeue(learner_queue, name)


class _Dequeue(Stream):
    def __init__(self, learner_queue: LearnerQueue, name: str):
        super().__init__(name)
        self.learner_queue = learner_queue

    def _iterate(self, ctx) -> Iterator[Any]:
        while True:
            try:
                yield self.learner_queue.queue.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                if ctx.closed:  # the plan is closing: end, so that the learner thread can stop
                    return
