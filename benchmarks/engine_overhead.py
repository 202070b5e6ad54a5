"""Engine overhead, flowrl vs its anchors, from one run.

    python benchmarks/engine_overhead.py [--items 200000] [--ray-items 3000]

1. Local executor: items/s through a chain of 5 map operators with tiny items, vs a plain
   Python loop making the same 5 calls. Prints the overhead per operator per item (goal <= 5 us).
2. Ray executor: per-item latency of `from_actors` over one actor (max_in_flight=1, so no
   pipelining hides the cost), vs a raw `ray.get(actor.method.remote())` loop (goal <= 1.5x).
   The default pipelined setting (max_in_flight=2) is printed as well.
"""

from __future__ import annotations

import argparse
import time

import ray

from flowrl import ActorSet, Plan, Stream, from_actors, make_executor
from flowrl.plan import PlanContext


def inc(x):
    return x + 1


class Ping:
    def __init__(self):
        self.n = 0

    def next(self):
        self.n += 1
        return self.n


def best_of(fn, repeats=3):
    return min(fn() for _ in range(repeats))


def local_chain(items: int) -> float:
    stream = Stream.from_iterable(range(items))
    for i in range(5):
        stream = stream.map(inc, name=f"inc{i}")
    with PlanContext.local() as ctx:
        it = ctx.open(stream)
        t0 = time.perf_counter()
        for _ in it:
            pass
        return time.perf_counter() - t0


def plain_loop(items: int) -> float:
    t0 = time.perf_counter()
    for x in range(items):
        inc(inc(inc(inc(inc(x)))))
    return time.perf_counter() - t0


def ray_raw(n: int) -> float:
    actor = ray.remote(Ping).options(num_cpus=0.1).remote()
    ray.get(actor.next.remote())
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(actor.next.remote())
    elapsed = time.perf_counter() - t0
    ray.kill(actor)
    return elapsed


def ray_flowrl(n: int, max_in_flight: int) -> float:
    actors = ActorSet(Ping, num_actors=1, num_cpus_per_actor=0.1)
    with PlanContext(make_executor("ray")) as ctx:
        it = ctx.open(from_actors(actors, "next", max_in_flight=max_in_flight))
        next(it)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--ray-items", type=int, default=3000)
    args = parser.parse_args()

    flow = best_of(lambda: local_chain(args.items))
    plain = best_of(lambda: plain_loop(args.items))
    per_op_us = (flow - plain) / args.items / 5 * 1e6
    print(f"local, 5 maps: flowrl {args.items / flow:,.0f} items/s   plain loop {args.items / plain:,.0f} items/s   "
          f"ratio {flow / plain:.2f}   overhead {per_op_us:.2f} us per operator per item (goal <= 5 us)")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    raw, flow1, flow2 = [], [], []
    for _ in range(3):  # interleaved so that noise hits each side alike
        raw.append(ray_raw(args.ray_items))
        flow1.append(ray_flowrl(args.ray_items, 1))
        flow2.append(ray_flowrl(args.ray_items, 2))
    raw_us = min(raw) / args.ray_items * 1e6
    f1_us = min(flow1) / args.ray_items * 1e6
    f2_us = min(flow2) / args.ray_items * 1e6
    print(f"ray, per hop: flowrl {f1_us:.0f} us (max_in_flight=1)   raw ray.get(actor.method.remote()) {raw_us:.0f} us   "
          f"ratio {f1_us / raw_us:.2f} (goal <= 1.5)")
    print(f"ray, per item with the default max_in_flight=2 (pipelined): {f2_us:.0f} us, ratio {f2_us / raw_us:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
