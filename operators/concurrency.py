"""Operators that run streams side by side: Concurrently, and a learner thread fed through a
bounded queue (LearnerQueue, Enqueue, Dequeue)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

from flowrl.stream import Map, Order, Stream, union


def Concurrently(streams: dict[str, Stream], output: str | list[str], order: Order = Order.ROUND_ROBIN,
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
    """
    outputs = [output] if isinstance(output, str) else list(output)
    unknown = [o for o in outputs if o not in streams]
    if unknown:
        raise ValueError(f"Concurrently: output {unknown} is not one of the streams {sorted(streams)}")
    tagged = [s.map(lambda item, key=key: (key, item), name=f"{name}[{key}]") for key, s in streams.items()]
    merged = union(*tagged, order=order, name=name)
    return merged.filter(lambda pair: pair[0] in outputs, name=f"{name}.output").map(
        lambda pair: pair[1], name=f"{name}.untag")


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

    def __call__(self, item: Any) -> Any:
        while True:
            try:
                self.learner_queue.queue.put(item, timeout=0.1)  # a timeout keeps Ctrl-C responsive
                return item
            except queue.Full:
                continue


def Dequeue(learner_queue: LearnerQueue, name: str = "Dequeue") -> Stream:
    """A stream of the items put into `learner_queue`, for the learner thread.

    >>> q = LearnerQueue(2); _ = Enqueue(q)(1); _ = Enqueue(q)(2)
    >>> from flowrl.stream import take
    >>> take(Dequeue(q), 2)
    [1, 2]
    """

    def items() -> Iterator[Any]:
        while True:
            try:
                yield learner_queue.queue.get(timeout=0.1)
            except queue.Empty:
                continue

    return Stream.source(items, name=name)
