"""Streams: the nodes of a plan's DAG, and the few primitives every operator is built from.

A `Stream` is a description, not a running iterator: building one does no work. When a `Plan`
starts, each node is opened once into a Python iterator, inside a `PlanContext` that owns the
counters, the executor and every thread the plan starts. Operators only ever see real items;
waiting for actors or threads is the executor's job.

>>> from flowrl.plan import Plan
>>> doubled = Stream.from_iterable(range(5)).map(lambda x: 2 * x, name="double")
>>> with Plan(doubled.filter(lambda x: x > 2)) as plan:
...     [plan.step()["output"] for _ in range(3)]
[4, 6, 8]
"""

from __future__ import annotations

import collections
import enum
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from flowrl.plan import PlanContext

T = TypeVar("T")
U = TypeVar("U")


class OperatorError(RuntimeError):
    """An operator raised. The message names the operator; `__cause__` holds the original
    exception with its traceback."""

    def __init__(self, operator: str, error: BaseException):
        self.operator = operator
        self.original = error
        super().__init__(f"operator {operator!r} failed: {type(error).__name__}: {error}")


class PlanStructureError(ValueError):
    """The DAG cannot run as built (a stream consumed twice, a fan-out branch left behind)."""


class Order(enum.Enum):
    """How `union` interleaves its inputs. The output type is the same either way."""

    ROUND_ROBIN = "round_robin"  # one item from each input in turn; deterministic
    AS_READY = "as_ready"        # whichever input has an item first (round robin on the local executor)


def operator_name(op: Any, name: str | None = None) -> str:
    """`name` if given, else the operator's own `name`, else its function or class name."""
    if name:
        return name
    own = getattr(op, "name", None)
    if isinstance(own, str) and own:
        return own
    fn_name = getattr(op, "__name__", None)
    if fn_name:
        return "lambda" if fn_name == "<lambda>" else fn_name
    return type(op).__name__


def _wrap_error(name: str, error: Exception) -> OperatorError:
    return error if isinstance(error, OperatorError) else OperatorError(name, error)


def _setup(op: Any, ctx: "PlanContext") -> None:
    setup = getattr(op, "setup", None)
    if callable(setup):
        setup(ctx)


# ---- operator base classes -------------------------------------------------------------------
class Operator:
    """Base class for operators with state. Subclass one of `Map`, `FlatMap` or `Filter` and
    implement `__call__`; `setup(ctx)` runs once when the plan starts (counters live in
    `ctx.counters`), `teardown()` once when it closes (flush files, release handles). `name`
    defaults to the class name."""

    name: str | None = None

    def setup(self, ctx: "PlanContext") -> None:
        pass

    def teardown(self) -> None:
        pass


class Map(Operator):
    """`__call__(item)` returns exactly one output item."""


class FlatMap(Operator):
    """`__call__(item)` returns an iterable of zero or more output items."""


class Filter(Operator):
    """`__call__(item)` returns True to keep the item."""


# ---- stream nodes ----------------------------------------------------------------------------
class Stream(Generic[T]):
    """A node in a plan's DAG that yields items of one type."""

    shared = False  # only fan-out hubs may be opened by several consumers

    def __init__(self, name: str, upstreams: tuple["Stream", ...] = ()):
        self.name = name
        self.upstreams = upstreams

    def _iterate(self, ctx: "PlanContext") -> Iterator[T]:
        raise NotImplementedError

    def walk(self) -> Iterator["Stream"]:
        """Every node of the DAG ending here, each once, upstream first."""
        seen: set[int] = set()

        def visit(node: Stream) -> Iterator[Stream]:
            if id(node) in seen:
                return
            seen.add(id(node))
            for up in node.upstreams:
                yield from visit(up)
            yield node

        return visit(self)

    # ---- building -----------------------------------------------------------------------------
    @staticmethod
    def source(factory: Callable[[], Iterable[T]], name: str | None = None) -> "Stream[T]":
        """A stream whose items come from `factory()`, called once each time a plan starts."""
        return _Source(factory, operator_name(factory, name))

    @staticmethod
    def from_iterable(items: Iterable[T], name: str = "from_iterable") -> "Stream[T]":
        """A stream over a re-iterable collection (a list, a range)."""
        return _Source(lambda: items, name)

    def then(self, op: Any, name: str | None = None) -> "Stream":
        """Apply an operator: a `Map`, `FlatMap` or `Filter` instance, or a plain function
        (taken as a map)."""
        if isinstance(op, FlatMap):
            return _FlatMap(self, op, operator_name(op, name))
        if isinstance(op, Filter):
            return _Filter(self, op, operator_name(op, name))
        if isinstance(op, Map) or callable(op):
            return _Map(self, op, operator_name(op, name))
        raise TypeError(f"then() takes an operator or a function, got {type(op).__name__}")

    def map(self, fn: Callable[[T], U], name: str | None = None) -> "Stream[U]":
        return _Map(self, fn, operator_name(fn, name))

    def flat_map(self, fn: Callable[[T], Iterable[U]], name: str | None = None) -> "Stream[U]":
        return _FlatMap(self, fn, operator_name(fn, name))

    def filter(self, fn: Callable[[T], bool], name: str | None = None) -> "Stream[T]":
        return _Filter(self, fn, operator_name(fn, name))

    def accumulate(self, until: Callable[[list[T]], bool], name: str = "accumulate") -> "Stream[list[T]]":
        """Collect items into a list until `until(items)` is true, then emit the list. A partial
        list left when the input ends is dropped."""
        return _FlatMap(self, _Accumulate(until), name)

    def fan_out(self, n: int, max_lag: int = 8) -> list["Stream[T]"]:
        """`n` streams that each see every item. A branch may run at most `max_lag` items ahead
        of the slowest one; past that a consumer in another thread waits, and one in the same
        thread gets a `PlanStructureError` (it would wait forever)."""
        hub = _FanOutHub(self, n, max_lag)
        return [_FanOutBranch(hub, i) for i in range(n)]

    def through_thread(self, maxsize: int = 2, name: str | None = None) -> "Stream[T]":
        """A bounded queue edge: everything upstream runs in its own thread, at most `maxsize`
        items ahead of the consumer (a learner thread, a prefetching reader)."""
        return _ThreadEdge(self, maxsize, name or f"{self.name}>thread")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def union(*streams: Stream[T], order: Order = Order.ROUND_ROBIN, name: str = "union") -> Stream[T]:
    """One stream with the items of all `streams`; ends when all of them end."""
    if not streams:
        raise ValueError("union needs at least one stream")
    return _Union(streams, order, name)


def zip_streams(name: str = "zip", **streams: Stream) -> Stream[dict[str, Any]]:
    """A stream of dicts, one item from each named stream per output; ends with the shortest.

    >>> from flowrl.plan import Plan
    >>> z = zip_streams(a=Stream.from_iterable([1, 2]), b=Stream.from_iterable("xyz"))
    >>> with Plan(z) as plan:   # a dict item is merged into the result record
    ...     result = plan.step()
    >>> result["a"], result["b"]
    (1, 'x')
    """
    if not streams:
        raise ValueError("zip_streams needs at least one named stream")
    return _Zip(streams, name)


class _Source(Stream[T]):
    def __init__(self, factory: Callable[[], Iterable[T]], name: str):
        super().__init__(name)
        self.factory = factory

    def _iterate(self, ctx):
        try:
            it = iter(self.factory())
        except Exception as e:
            raise _wrap_error(self.name, e) from e
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise _wrap_error(self.name, e) from e
            yield item


class _Map(Stream):
    _materialize = False  # FlatMap: run the whole of fn(item) inside the timing and error naming

    def __init__(self, upstream: Stream, fn: Callable, name: str):
        super().__init__(name, (upstream,))
        self.fn = fn

    def _calls(self, ctx):
        """(item, fn(item)) for each input item: the one loop every map-like node shares, which
        sets the operator up, times it and names it in errors."""
        _setup(self.fn, ctx)
        fn, name, clock, materialize = self.fn, self.name, time.perf_counter, self._materialize
        spent = ctx.operator_time
        spent.setdefault(name, 0.0)
        try:
            for item in ctx.open(self.upstreams[0]):
                t0 = clock()
                try:
                    out = list(fn(item)) if materialize else fn(item)
                except Exception as e:
                    raise _wrap_error(name, e) from e
                spent[name] += clock() - t0
                yield item, out
        finally:
            teardown = getattr(fn, "teardown", None)
            if callable(teardown):
                teardown()

    def _iterate(self, ctx):
        for _, out in self._calls(ctx):
            yield out


class _FlatMap(_Map):
    _materialize = True

    def _iterate(self, ctx):
        for _, outs in self._calls(ctx):
            yield from outs


class _Filter(_Map):
    def _iterate(self, ctx):
        for item, keep in self._calls(ctx):
            if keep:
                yield item


class _Accumulate(FlatMap):
    def __init__(self, until: Callable[[list], bool]):
        self.until = until
        self.buffer: list = []

    def __call__(self, item):
        self.buffer.append(item)
        if self.until(self.buffer):
            out, self.buffer = self.buffer, []
            return [out]
        return []


class _Union(Stream):
    def __init__(self, streams, order: Order, name: str):
        super().__init__(name, tuple(streams))
        self.order = order

    def _iterate(self, ctx):
        if self.order is Order.AS_READY and ctx.executor.concurrent:
            yield from self._as_ready(ctx)
            return
        live = [ctx.open(s) for s in self.upstreams]
        while live:
            for it in list(live):
                try:
                    item = next(it)
                except StopIteration:
                    live.remove(it)
                    continue
                yield item

    def _as_ready(self, ctx):
        # Each input is pumped by its own thread into one queue no longer than the number of
        # inputs, so at most one item per input waits here.
        merged: queue.Queue = queue.Queue(maxsize=len(self.upstreams))
        pumps = [_Pump(ctx, s, merged, f"{self.name}[{i}]") for i, s in enumerate(self.upstreams)]
        yield from _drain(merged, pumps)


class _Zip(Stream):
    def __init__(self, streams: dict[str, Stream], name: str):
        super().__init__(name, tuple(streams.values()))
        self.keys = list(streams)

    def _iterate(self, ctx):
        its = [ctx.open(s) for s in self.upstreams]
        for values in zip(*its):
            yield dict(zip(self.keys, values))


class _FanOutHub(Stream):
    shared = True

    def __init__(self, upstream: Stream, n: int, max_lag: int):
        if n < 1 or max_lag < 1:
            raise ValueError("fan_out needs n >= 1 and max_lag >= 1")
        super().__init__(f"{upstream.name}>fan_out", (upstream,))
        self.n, self.max_lag = n, max_lag

    def _iterate(self, ctx):
        return _FanOutState(ctx.open(self.upstreams[0]), self.n, self.max_lag, self.name)


class _FanOutState:
    """The running side of a fan-out: one buffer per branch, filled by whichever branch pulls."""

    def __init__(self, upstream: Iterator, n: int, max_lag: int, name: str):
        self.upstream, self.max_lag, self.name = upstream, max_lag, name
        self.buffers = [collections.deque() for _ in range(n)]
        self.threads: list[int | None] = [None] * n
        self.done = False
        self.cond = threading.Condition()

    def next_for(self, i: int):
        with self.cond:
            self.threads[i] = threading.get_ident()
            while True:
                if self.buffers[i]:
                    item = self.buffers[i].popleft()
                    self.cond.notify_all()
                    return item
                if self.done:
                    raise StopIteration
                lagging = [j for j, b in enumerate(self.buffers) if j != i and len(b) >= self.max_lag]
                if not lagging:
                    break
                if all(self.threads[j] in (None, self.threads[i]) for j in lagging):
                    raise PlanStructureError(
                        f"fan-out of {self.name!r}: branch {i} is {self.max_lag} items ahead of branch "
                        f"{lagging[0]}, which is consumed in the same thread; consume the branches in turn "
                        "(for example with union(..., order=Order.ROUND_ROBIN)) or raise max_lag")
                self.cond.wait(timeout=0.1)
            try:
                item = next(self.upstream)
            except StopIteration:
                self.done = True
                self.cond.notify_all()
                raise
            for j, b in enumerate(self.buffers):
                if j != i:
                    b.append(item)
            self.cond.notify_all()
            return item


class _FanOutBranch(Stream):
    def __init__(self, hub: _FanOutHub, index: int):
        super().__init__(f"{hub.name}[{index}]", (hub,))
        self.index = index

    def _iterate(self, ctx):
        state = ctx.open(self.upstreams[0])
        while True:
            try:
                item = state.next_for(self.index)
            except StopIteration:
                return
            yield item


# ---- the thread edge -------------------------------------------------------------------------
_ITEM, _END, _ERROR = 0, 1, 2


class _Pump:
    """Runs one upstream iterator in a daemon thread, putting its items into a bounded queue.
    Stops within ~0.1 s of `stop` being set. Registered with the plan context, which stops and
    joins it on close."""

    def __init__(self, ctx: "PlanContext", upstream: Stream, out: queue.Queue, name: str):
        self.it = ctx.open(upstream)
        self.out = out
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"flowrl:{name}", daemon=True)
        ctx.register_thread(self)
        self.thread.start()

    def _put(self, message) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.it:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, self))
        except BaseException as e:  # handed to the consumer, which re-raises it in its thread
            self._put((_ERROR, e))
        finally:
            close = getattr(self.it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    def close(self, timeout: float = 5.0) -> None:
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


def _drain(q: queue.Queue, pumps: list[_Pump]) -> Iterator:
    live = len(pumps)
    try:
        while live:
            try:
                kind, value = q.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                if all(p.stop.is_set() and not p.thread.is_alive() for p in pumps):
                    return  # the plan is closing: every producer stopped without finishing
                continue
            if kind == _ITEM:
                yield value
            elif kind == _END:
                live -= 1
            else:
                raise value
    finally:
        for p in pumps:
            p.stop.set()


class _ThreadEdge(Stream):
    def __init__(self, upstream: Stream, maxsize: int, name: str):
        if maxsize < 1:
            raise ValueError("through_thread needs maxsize >= 1")
        super().__init__(name, (upstream,))
        self.maxsize = maxsize

    def _iterate(self, ctx):
        q: queue.Queue = queue.Queue(maxsize=self.maxsize)
        yield from _drain(q, [_Pump(ctx, self.upstreams[0], q, self.name)])


def take(stream: Stream[T], n: int) -> list[T]:
    """Run `stream` alone on the local executor and return its first `n` items (for tests)."""
    from flowrl.plan import PlanContext

    with PlanContext.local() as ctx:
        return list(itertools.islice(ctx.open(stream), n))
