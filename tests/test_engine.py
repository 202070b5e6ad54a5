"""Engine tests. Every test runs on both executors through the `executor` fixture, and the
answers must agree: exact where the order is defined, as multisets where it is "as ready"."""

import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

from flowrl import (ActorRestartLimitError, ActorSet, FlatMap, Map, OperatorError, Order, Plan,
                    PlanStructureError, Stream, from_actors, gather_sync, make_executor, union, zip_streams)
from flowrl.testing import CountingSource, alive_ray_actors, flowrl_threads, wait_until

FAST = {"num_cpus_per_actor": 0.1}



def outputs(plan, n):
    return [plan.step()["output"] for _ in range(n)]


def sources(n=2, **kwargs):
    return ActorSet(CountingSource, num_actors=n, kwargs=kwargs, **FAST)


def assert_released(executor, before_threads=()):
    assert wait_until(lambda: not [t for t in flowrl_threads() if t not in before_threads], 5)
    if executor.name == "ray":
        assert wait_until(lambda: not alive_ray_actors("CountingSource"), 10), alive_ray_actors("CountingSource")


# ---- primitives and their ordering ------------------------------------------------------------
def test_map_flat_map_filter_keep_order(executor):
    class Pairs(FlatMap):
        def __call__(self, x):
            return [x, x]

    s = Stream.from_iterable(range(6)).map(lambda x: x + 1).then(Pairs()).filter(lambda x: x % 2 == 0)
    with Plan(s, executor=executor) as plan:
        assert [r["output"] for r in plan.run()] == [2, 2, 4, 4, 6, 6]


def test_accumulate_emits_lists_until_predicate(executor):
    s = Stream.from_iterable([0, 1, 2, 3, 4, 5, 6, 1]).accumulate(lambda buf: sum(buf) >= 5)
    with Plan(s, executor=executor) as plan:  # the partial [1] left at the end is dropped
        assert [r["output"] for r in plan.run()] == [[0, 1, 2, 3], [4, 5], [6]]


def test_union_round_robin_is_exact(executor):
    s = union(Stream.from_iterable("abc"), Stream.from_iterable("xy"))
    with Plan(s, executor=executor) as plan:
        assert [r["output"] for r in plan.run()] == ["a", "x", "b", "y", "c"]


def test_union_as_ready_keeps_every_item_and_each_inputs_order(executor):
    s = union(Stream.from_iterable(range(0, 50)), Stream.from_iterable(range(100, 150)), order=Order.AS_READY)
    with Plan(s, executor=executor) as plan:
        got = [r["output"] for r in plan.run()]
    assert sorted(got) == list(range(50)) + list(range(100, 150))
    assert [x for x in got if x < 100] == list(range(50))
    assert [x for x in got if x >= 100] == list(range(100, 150))


def test_zip_pairs_by_name_and_ends_with_shortest(executor):
    s = zip_streams(obs=Stream.from_iterable([1, 2, 3]), act=Stream.from_iterable("ab"))
    with Plan(s, executor=executor) as plan:
        results = list(plan.run())
    assert [(r["obs"], r["act"]) for r in results] == [(1, "a"), (2, "b")]


def test_fan_out_gives_every_branch_every_item(executor):
    left, right = Stream.from_iterable(range(5)).fan_out(2)
    s = zip_streams(left=left.map(lambda x: x * 10), right=right)
    with Plan(s, executor=executor) as plan:
        assert [(r["left"], r["right"]) for r in plan.run()] == [(0, 0), (10, 1), (20, 2), (30, 3), (40, 4)]


def test_fan_out_branch_left_behind_in_same_thread_is_an_error(executor):
    a, b = Stream.from_iterable(range(100)).fan_out(2, max_lag=3)
    with Plan(zip_streams(a=a, b=b.filter(lambda x: False)), executor=executor) as plan:
        with pytest.raises(PlanStructureError, match="ahead of branch"):
            plan.step()


def test_stream_feeding_two_consumers_without_fan_out_is_an_error(executor):
    s = Stream.from_iterable(range(3))
    with Plan(zip_streams(a=s, b=s), executor=executor) as plan:
        with pytest.raises(PlanStructureError, match="fan_out"):
            plan.step()


def test_thread_edge_keeps_order_and_crosses_a_thread(executor):
    seen_threads = set()

    def note(x):
        seen_threads.add(threading.current_thread().name)
        return x

    s = Stream.from_iterable(range(20)).map(note).through_thread(maxsize=2, name="learner")
    with Plan(s, executor=executor) as plan:
        assert [r["output"] for r in plan.run()] == list(range(20))
    assert seen_threads == {"flowrl:learner"}


def test_from_actors_yields_each_actors_items_in_order(executor):
    with Plan(from_actors(sources(2), "next"), executor=executor) as plan:
        got = outputs(plan, 20)
    per_actor = collections.defaultdict(list)
    for index, n in got:
        per_actor[index].append(n)
    for index, ns in per_actor.items():
        assert ns == list(range(1, len(ns) + 1))
    if executor.name == "local":  # round robin, deterministic
        assert got[:4] == [(0, 1), (1, 1), (0, 2), (1, 2)]


def test_gather_sync_yields_lists_in_actor_order(executor):
    with Plan(gather_sync(sources(3), "next"), executor=executor) as plan:
        assert outputs(plan, 2) == [[(0, 1), (1, 1), (2, 1)], [(0, 2), (1, 2), (2, 2)]]


# ---- iterations, counters, composition -----------------------------------------------------------
class CountSteps(Map):
    def setup(self, ctx):
        self.counters = ctx.counters

    def __call__(self, item):
        self.counters["num_env_steps_sampled"] += 10
        return item


def test_results_carry_plan_owned_counters(executor):
    s = gather_sync(sources(2), "next").then(CountSteps())
    with Plan(s, executor=executor, min_items=3) as plan:
        r1, r2 = plan.step(), plan.step()
    assert r1["num_env_steps_sampled"] == 30 and r2["num_env_steps_sampled"] == 60
    assert r2["training_iteration"] == 2 and r2["items_this_iter"] == 3
    assert r2["time_total_s"] >= r2["time_this_iter_s"] > 0
    assert r2["num_actor_restarts"] == 0


def test_report_function_adds_to_result(executor):
    def report(item, ctx):
        return {"last": item, "sampled": ctx.counters["num_env_steps_sampled"]}

    with Plan(Stream.from_iterable(range(5)).then(CountSteps()), report=report, executor=executor) as plan:
        result = plan.step()
    assert result["last"] == 0 and result["sampled"] == 10 and "output" not in result


def test_run_stops_on_the_first_condition_met(executor):
    with Plan(Stream.from_iterable(range(100)).then(CountSteps()), executor=executor) as plan:
        results = list(plan.run(stop={"num_env_steps_sampled": 45, "training_iteration": 99}))
    assert [r["training_iteration"] for r in results] == [1, 2, 3, 4, 5]


def test_plans_nest(executor):
    inner = Plan(Stream.from_iterable(range(4)).then(CountSteps()), name="inner")
    outer = inner.as_stream().map(lambda r: (r["output"], r["num_env_steps_sampled"]))
    with Plan(outer, executor=executor) as plan:
        assert [r["output"] for r in plan.run()] == [(0, 10), (1, 20), (2, 30), (3, 40)]
        assert plan.counters["num_env_steps_sampled"] == 0  # the inner plan keeps its own counters


def test_plan_built_with_fake_source_steps_without_actors(executor):
    fake = Stream.from_iterable([{"loss": 1.0}, {"loss": 0.5}], name="fake_learner")
    with Plan(fake, executor=executor) as plan:
        assert [r["loss"] for r in plan.run()] == [1.0, 0.5]


def test_operator_names_default_to_class_and_can_be_overridden(executor):
    assert Stream.from_iterable([]).then(CountSteps()).name == "CountSteps"
    assert Stream.from_iterable([]).then(CountSteps(), name="count").name == "count"

    def scale(x):
        return x

    assert Stream.from_iterable([]).map(scale).name == "scale"


# ---- errors and shutdown ------------------------------------------------------------------------
def explode(x):
    if x == 3:
        raise ZeroDivisionError("boom at 3")
    return x


def test_operator_error_names_operator_and_keeps_traceback(executor):
    before = flowrl_threads()
    s = from_actors(sources(2), "next").map(lambda t: t[1]).map(explode, name="exploder").through_thread()
    plan = Plan(s, executor=executor)
    with pytest.raises(OperatorError, match="operator 'exploder' failed: ZeroDivisionError: boom at 3") as info:
        for _ in range(20):
            plan.step()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "in explode" in "".join(traceback.format_exception(info.value.__cause__))
    assert_released(executor, before)


def test_error_inside_an_actor_names_the_source(executor):
    s = from_actors(sources(1, fail_at=2), "next", name="rollouts")
    plan = Plan(s, executor=executor)
    with pytest.raises(OperatorError, match="'rollouts' failed") as info:
        outputs(plan, 5)
    assert isinstance(info.value.__cause__, ValueError)
    assert "source 0 fails at item 2" in str(info.value)
    assert_released(executor)


def test_close_releases_actors_and_threads(executor):
    before = flowrl_threads()
    s = union(from_actors(sources(2), "next").through_thread(), Stream.from_iterable(range(1000)).through_thread(),
              order=Order.AS_READY)
    plan = Plan(s, executor=executor).start()
    outputs(plan, 10)
    assert len(flowrl_threads()) > len(before)
    plan.close()
    assert_released(executor, before)


# ---- backpressure --------------------------------------------------------------------------------
@pytest.mark.parametrize("max_in_flight, queue_size", [(1, 1), (2, 3)])
def test_slow_consumer_bounds_items_in_flight(executor, max_in_flight, queue_size):
    actors = sources(2)
    s = from_actors(actors, "next", max_in_flight=max_in_flight).through_thread(maxsize=queue_size)
    # Items can wait in: actor calls in flight, the queue, and the one the pump thread holds.
    bound = actors.num_actors * max_in_flight + queue_size + 1
    with Plan(s, executor=executor) as plan:
        consumed = 0
        worst = 0
        for _ in range(12):
            plan.step()
            consumed += 1
            time.sleep(0.05)  # a slow sink: producers get every chance to run ahead
            produced = sum(actors.foreach("produced"))
            worst = max(worst, produced - consumed)
    assert worst <= bound, (worst, bound)


# ---- actor death ---------------------------------------------------------------------------------
def test_dead_actor_is_replaced_and_counted(executor):
    actors = sources(2)
    with Plan(from_actors(actors, "next"), executor=executor) as plan:
        # Until actor 0's first output has come (on a loaded machine actor 1 can give the first
        # several): a (0, 1) after the kill is then the replacement's, not one already in flight.
        seen, deadline = [], time.monotonic() + 30
        while not any(i == 0 for i, _ in seen) and time.monotonic() < deadline:
            seen.append(plan.step()["output"])
        assert any(i == 0 for i, _ in seen), seen
        actors.kill(0)
        # The stream goes on while the replacement starts; it starts over from 1, being a new
        # actor built with the same arguments.
        got, deadline = [], time.monotonic() + 30
        while (0, 1) not in got and time.monotonic() < deadline:
            got.append(plan.step()["output"])
        assert (0, 1) in got
        assert plan.step()["num_actor_restarts"] == 1


def test_restart_limit_stops_the_plan_with_a_clear_error(executor):
    actors = ActorSet(CountingSource, num_actors=1, max_restarts=1, **FAST)
    plan = Plan(gather_sync(actors, "next"), executor=executor)
    outputs(plan, 1)
    actors.kill(0)
    outputs(plan, 1)
    actors.kill(0)
    with pytest.raises(ActorRestartLimitError, match="max_restarts=1"):
        outputs(plan, 1)
    plan.close()
    assert_released(executor)


def test_foreach_latest_skips_an_actor_still_busy_with_the_previous_push(executor):
    """Weights pushes (UpdateWeights(wait=False)): a busy actor gets the latest push, not a queue."""
    actors = ActorSet(CountingSource, num_actors=1, kwargs={"delay_s": 0.5}, **FAST)
    with Plan(gather_sync(actors, "produced"), executor=executor) as plan:
        assert plan.step()["output"] == [0]  # the actors start with the plan
        assert actors.foreach_latest("next") == 1
        if executor.concurrent:  # the first push is still running: the second one is not sent
            assert actors.foreach_latest("next") == 0
            assert wait_until(lambda: actors.foreach("produced") == [1], 5)
        assert actors.foreach_latest("next") == 1
        assert actors.foreach("produced") == [2]


def test_actor_process_crash_is_replaced(ray_session):
    actors = ActorSet(CountingSource, num_actors=2, kwargs={"exit_at": 3}, max_restarts=10, **FAST)
    with Plan(from_actors(actors, "next", max_in_flight=1), executor=make_executor("ray")) as plan:
        got = outputs(plan, 8)
        assert plan.step()["num_actor_restarts"] >= 1
    assert all(n < 3 for _, n in got)


# ---- Ctrl-C --------------------------------------------------------------------------------------
CTRL_C_SCRIPT = textwrap.dedent("""
    import sys, time
    from flowrl import ActorSet, Plan, from_actors, make_executor
    from flowrl.testing import CountingSource
    kind = sys.argv[1]
    ex = make_executor(kind, num_cpus=2) if kind == "ray" else make_executor(kind)
    actors = ActorSet(CountingSource, num_actors=2, kwargs={"delay_s": 0.05}, num_cpus_per_actor=0.1)
    plan = Plan(from_actors(actors, "next").through_thread(), executor=ex)
    try:
        for result in plan.run():
            print("step", result["training_iteration"], flush=True)
    except KeyboardInterrupt:
        t0 = time.monotonic()
        plan.close()
        print(f"closed in {time.monotonic() - t0:.2f}s", flush=True)
        sys.exit(130)
""")


def test_ctrl_c_stops_a_running_plan_within_seconds(executor, tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), executor.name], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 5"):
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "closed in" in rest
    assert elapsed < 10, elapsed


def test_results_report_time_spent_in_each_operator_by_name(executor):
    def slow(x):
        time.sleep(0.01)
        return x

    s = Stream.from_iterable(range(10)).map(slow, name="slow_op").map(lambda x: x, name="fast_op")
    with Plan(s, executor=executor, min_items=3) as plan:
        first, second = plan.step(), plan.step()
    for r in (first, second):  # per iteration, not cumulative
        assert 0.025 <= r["operator_time_s"]["slow_op"] < 0.5
        assert r["operator_time_s"]["fast_op"] < r["operator_time_s"]["slow_op"]
