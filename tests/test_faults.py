"""Faults during a run: envs that raise (restart_failed_sub_environments, replaced remote
workers, one-line stops), actors whose constructor raises, NaN/inf and wrongly shaped
observations, and Ray resources that cannot be had."""

import inspect
import json
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from flowrl import ActorSet, Plan, make_executor
from flowrl.cli import main
from flowrl.envs import EnvFaultError
from flowrl.executors import ActorPlacementError, ActorStartError
from flowrl.operators import Gather, ParallelRollouts, StandardMetricsReporting
from flowrl.rollout import RolloutWorker, WorkerSet
from flowrl.testing import CountingSource
from flowrl.testing_envs import FlakyCartPole

FLAKY = "flowrl.testing_envs:FlakyCartPole"
_lines, _first = inspect.getsourcelines(FlakyCartPole.step)
_raise_line = _first + next(i for i, line in enumerate(_lines) if "raise RuntimeError" in line)
RAISED_AT = f"testing_envs.py:{_raise_line} in step"  # where FlakyCartPole raises


def run_cli(*argv):
    return main([str(a) for a in argv])


def plan_file(tmp_path, env_config, steps=4096, **config):
    config = {"train_batch_size": 128, "sgd_minibatch_size": 64, "num_sgd_iter": 1, "num_envs_per_worker": 2,
              "rollout_fragment_length": 64, "checkpoint_freq": 0, "seed": 0, "env_config": env_config, **config}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"flaky": {"env": FLAKY, "run": "PPO", "stop": {"timesteps_total": steps},
                                              "config": config}}))
    return path


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowrl: error: ") and "Traceback" not in err, err
    return lines[0]


# ---- restart_failed_sub_environments -------------------------------------------------------------
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_a_restarted_sub_env_drops_its_episode_and_is_counted(vectorization):
    # Each copy raises at its 5th step and is made anew, which raises at its own 5th step, ...:
    # per sub-env the steps go V V V V F V V V V F ... (F: the step that raised, no transition).
    # CartPole cannot end an episode in 4 steps, so every episode is cut by a fault.
    w = RolloutWorker(FLAKY, num_envs_per_worker=2, rollout_fragment_length=8, env_config={"fail_at_step": 5},
                      restart_failed_sub_environments=True, seed=0, vectorization=vectorization)
    batches = [w.sample() for _ in range(3)]
    # 8 rows per sub-env: steps 1-9 (1 fault), then 10-19 (2 faults), then 20-29 (2 faults).
    assert [b.env_faults for b in batches] == [2 * 1, 2 * 2, 2 * 2]
    for b in batches:
        assert len(b) == 16
        assert b["t"].tolist() == [0, 1, 2, 3] * 4  # a new episode after each fault
        assert b.episodes == []                      # a cut episode never finishes
        assert not b["terminateds"].any() and not b["truncateds"].any()
        eps = b["eps_id"]
        assert len(set(eps.tolist())) == 4 and (eps[::4] == eps[3::4]).all()
        # No bogus transition: within an episode each row goes on from the last one...
        same = eps[1:] == eps[:-1]
        np.testing.assert_array_equal(b["new_obs"][:-1][same], b["obs"][1:][same])
        # ...and a row cut by a fault bootstraps from V of its own new_obs.
        cut = np.flatnonzero(b["t"] == 3)
        np.testing.assert_allclose(b["next_vf_preds"][cut], w.policy.value(b["new_obs"][cut]), rtol=1e-5, atol=1e-6)
    w.close()


def test_faults_amid_episode_ends_and_fragment_boundaries_keep_every_row_a_transition():
    w = RolloutWorker(FLAKY, num_envs_per_worker=3, rollout_fragment_length=13, seed=2,
                      env_config={"fail_at_step": 11, "fail_every": 7}, restart_failed_sub_environments=True)
    reported = 0
    for _ in range(8):
        b = w.sample()
        reported += b.env_faults
        # Every fault is reported with the call that met it, even when rows after it wait for the next call.
        assert reported == sum(sub_env.num_remakes for sub_env in w.env.envs)
        assert len(b) == 3 * 13
        eps, t = b["eps_id"], b["t"]
        same = eps[1:] == eps[:-1]
        np.testing.assert_array_equal(t[1:][same], t[:-1][same] + 1)
        np.testing.assert_array_equal(b["new_obs"][:-1][same], b["obs"][1:][same])
        assert not (b["terminateds"] | b["truncateds"])[:-1][same].any()  # an episode ends on its last row
    assert reported > 8


def test_a_sub_env_that_cannot_reset_is_made_anew_too():
    w = RolloutWorker(FLAKY, num_envs_per_worker=1, rollout_fragment_length=200,
                      env_config={"fail_at_step": 1, "fault": "raise_on_reset"}, restart_failed_sub_environments=True,
                      seed=0)
    b = w.sample()
    # Every copy fails its first autoreset, so each episode that ends is followed by a copy made
    # anew, unless it ends on the last row (its reset comes with the next call).
    ends_last = bool(b["terminateds"][-1] or b["truncateds"][-1])
    assert len(b.episodes) >= 2 and b.env_faults == len(b.episodes) - ends_last
    assert b["t"][0] == 0 and (b["t"][1:] != b["t"][:-1] + 1).sum() == len(b.episodes) - ends_last


def test_restart_failed_sub_environments_counts_faults_on_both_executors(executor):
    ws = WorkerSet(num_workers=1, env=FLAKY, num_envs_per_worker=2, rollout_fragment_length=8, seed=0,
                   env_config={"fail_at_step": 5}, restart_failed_sub_environments=True, num_cpus_per_worker=0.5)
    with Plan(ParallelRollouts(ws, Gather.SYNC), report=StandardMetricsReporting(), executor=executor) as plan:
        results = [plan.step() for _ in range(3)]
    # 2 sub-envs with 1, 2, 2 faults in their first three batches (see the test above).
    assert [r["num_env_faults"] for r in results] == [2, 6, 10]
    assert [r["num_actor_restarts"] for r in results] == [0, 0, 0]
    assert results[-1]["episodes_total"] == 0


# ---- without the option ----------------------------------------------------------------------------
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_an_env_that_raises_names_the_env_the_error_and_the_step(vectorization):
    w = RolloutWorker(FLAKY, num_envs_per_worker=2, rollout_fragment_length=8, env_config={"fail_at_step": 5},
                      vectorization=vectorization)
    with pytest.raises(EnvFaultError) as info:
        w.sample()
    # Both copies fail at the same step. The sync vector env steps copy 0 first; the async one
    # reports whichever copy's subprocess answered last, so either may be named there.
    sub_env = "0" if vectorization == "sync" else "[01]"
    assert re.fullmatch(rf"worker 0: env {re.escape(repr(FLAKY))} \(sub-env {sub_env}\) raised RuntimeError: "
                        rf"FlakyCartPole fails at step 5 \({re.escape(RAISED_AT)}\) at step 5 of an episode",
                        str(info.value)), str(info.value)


def test_the_local_executor_stops_with_one_line_after_a_checkpoint(tmp_path, capsys):
    # 2 sub-envs x 64 steps = 128 rows per iteration; a copy raises at its 300th step (iteration 5).
    path = plan_file(tmp_path, {"fail_at_step": 300})
    assert run_cli("run", path, "--output-dir", tmp_path / "runs", "--quiet") == 1
    line = one_error_line(capsys.readouterr().err)
    # Whichever copy had fewer resets reaches its 300th step first.
    assert re.search(rf"worker 0: env {re.escape(repr(FLAKY))} \(sub-env [01]\) raised RuntimeError: FlakyCartPole "
                     rf"fails at step 300 \({RAISED_AT}\) at step \d+ of an episode", line), line
    run_dir = (tmp_path / "runs" / "flaky" / "latest").resolve()
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint_*"))
    assert [c.name for c in checkpoints] == ["checkpoint_000004"]
    assert f"checkpoint saved in {checkpoints[0]} (--resume {run_dir} continues)" in line


def test_a_remote_worker_whose_env_raised_is_replaced_and_counted(tmp_path, capsys, ray_session):
    # Each worker's copies raise at their 100th step, in the worker's second batch: the first
    # worker is replaced (max_actor_restarts: 1), its replacement fails too and stops the run.
    path = plan_file(tmp_path, {"fail_at_step": 100}, max_actor_restarts=1, num_cpus_per_worker=0.5)
    assert run_cli("run", path, "--executor", "ray", "--num-workers", "1", "--output-dir", tmp_path / "runs",
                   "--quiet") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "RolloutWorker actor 1 failed (worker 1: env" in line and "FlakyCartPole fails at step 100" in line
    assert "reached max_restarts=1" in line and "checkpoint saved in" in line
    run_dir = (tmp_path / "runs" / "flaky" / "latest").resolve()
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["num_actor_restarts"], r["num_env_faults"]) for r in rows] == [(0, 0), (1, 1)]


# ---- an actor whose constructor raises --------------------------------------------------------------
def test_a_worker_that_cannot_import_the_env_stops_at_once_with_the_real_error(tmp_path, capsys, monkeypatch,
                                                                            ray_session):
    # The env's module is on the driver's sys.path only, as on a cluster node that lacks the
    # user's files: the driver makes the env, a Ray worker cannot import it.
    code = tmp_path / "code"
    code.mkdir()
    (code / "driver_only_env.py").write_text("from flowrl.testing_envs import FlakyCartPole as Env\n")
    monkeypatch.syspath_prepend(str(code))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"x": {"env": "driver_only_env:Env", "run": "PPO", "stop": {"timesteps_total": 256},
                                          "config": {"num_cpus_per_worker": 0.5, "train_batch_size": 128,
                                                     "sgd_minibatch_size": 64}}}))
    t0 = time.monotonic()
    assert run_cli("run", path, "--executor", "ray", "--num-workers", "1", "--output-dir", tmp_path / "runs",
                   "--quiet") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "RolloutWorker actor 1 could not start on node " in line
    assert "EnvError: env 'driver_only_env:Env': cannot load entry point (No module named 'driver_only_env')" in line
    assert "restart" not in line and time.monotonic() - t0 < 30


class _RaisesInRayWorkers:
    def __init__(self):
        raise ModuleNotFoundError("No module named 'only_on_the_driver'")


def test_an_actor_whose_constructor_raises_is_not_restarted(ray_session):
    actors = ActorSet(_RaisesInRayWorkers, num_actors=2, num_cpus_per_actor=0.1, max_restarts=3)
    with pytest.raises(ActorStartError, match=r"^_RaisesInRayWorkers actor \d could not start on node \S+: "
                                              r"ModuleNotFoundError: No module named 'only_on_the_driver'"):
        actors.start(make_executor("ray"))
    assert actors.num_restarts == 0 and not actors.started


# ---- NaN, inf, wrong shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("fault, message", [
    ("nan_obs", "gave NaN in column 'new_obs' (sub-env 0, at step 5 of an episode)"),
    ("inf_reward", "gave inf in column 'rewards' (sub-env 0, at step 5 of an episode)"),
])
def test_nan_and_inf_are_found_where_the_batch_is_built(fault, message):
    # The copies' 5th step gives the bad value (no CartPole episode is over within 5 steps).
    w = RolloutWorker(FLAKY, num_envs_per_worker=2, rollout_fragment_length=8, seed=1,
                      env_config={"fail_at_step": 5, "fault": fault})
    with pytest.raises(EnvFaultError) as info:
        w.sample()
    assert str(info.value) == f"worker 0: env {FLAKY!r} {message}"


def test_an_observation_of_the_wrong_shape_names_both_shapes():
    w = RolloutWorker(FLAKY, num_envs_per_worker=2, rollout_fragment_length=8, seed=1,
                      env_config={"fail_at_step": 3, "fault": "wrong_shape"})
    with pytest.raises(EnvFaultError) as info:
        w.sample()
    assert str(info.value) == (f"worker 0: env {FLAKY!r} (sub-env 0) gave an observation of shape (5,) at step 3 of "
                               "an episode; its observation_space has shape (4,)")


def test_nan_stops_the_cli_with_one_line(tmp_path, capsys):
    path = plan_file(tmp_path, {"fail_at_step": 30, "fault": "nan_obs"}, seed=1)
    assert run_cli("run", path, "--output-dir", tmp_path / "runs", "--quiet") == 1
    assert "gave NaN in column 'new_obs'" in one_error_line(capsys.readouterr().err)


# ---- Ray resources ------------------------------------------------------------------------------------
def _in_thread(fn, timeout_s):
    """fn() in a thread; its result or exception, or TimeoutError if it hangs (old code did)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"still waiting after {timeout_s} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_more_workers_than_the_cluster_has_cpus_is_refused_up_front(ray_session):
    ws = WorkerSet(num_workers=3, env="CartPole-v1", num_envs_per_worker=1, rollout_fragment_length=8, seed=0)
    plan = Plan(ParallelRollouts(ws, Gather.SYNC), executor=make_executor("ray"))
    with pytest.raises(ActorPlacementError) as info:
        _in_thread(plan.step, 30)
    assert str(info.value) == ("3 RolloutWorker actors x 1 CPU = 3 CPUs asked for, but the Ray cluster has 2 CPUs; "
                               "lower num_workers or num_cpus_per_worker, or join a bigger cluster with --address")
    plan.close()


def test_more_workers_than_cpus_exits_2_from_the_cli(tmp_path, capsys, ray_session):
    path = plan_file(tmp_path, {"fail_at_step": 10_000})
    assert run_cli("run", path, "--executor", "ray", "--num-workers", "3", "--output-dir", tmp_path / "runs") == 2
    assert "3 CPUs asked for, but the Ray cluster has 2 CPUs" in one_error_line(capsys.readouterr().err)


class _Blocker:
    """Holds CPUs so that nothing else can be placed."""

    def ready(self):
        return True


@pytest.fixture
def cpus_taken(ray_session):
    import ray

    blocker = ray.remote(num_cpus=2)(_Blocker).remote()
    ray.get(blocker.ready.remote(), timeout=60)
    yield blocker
    ray.kill(blocker)


def test_actors_not_placed_in_time_say_what_was_asked_and_what_exists(cpus_taken):
    actors = ActorSet(CountingSource, num_actors=2, num_cpus_per_actor=0.5, start_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ActorPlacementError) as info:
        actors.start(make_executor("ray"))
    assert time.monotonic() - t0 < 10
    assert str(info.value) == ("CountingSource actor 0, CountingSource actor 1 not placed after 1 s: each asks for 0.5 "
                               "CPU; the Ray cluster has 2 CPUs, 0 free now (others hold the rest); free them, lower "
                               "num_workers or num_cpus_per_worker, or raise actor_start_timeout_s")


def test_a_first_ctrl_c_while_workers_wait_for_cpus_stops_at_once(tmp_path, capsys, cpus_taken):
    import ray

    from flowrl.experiment import load_experiments, run_experiment

    from flowrl.testing import alive_ray_actors, wait_until

    exp, = load_experiments(plan_file(tmp_path, {"fail_at_step": 10_000}, num_workers=1))
    sent = []

    def ctrl_c_once_the_worker_waits():
        if wait_until(lambda: alive_ray_actors("RolloutWorker"), 30):
            time.sleep(0.5)
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_the_worker_waits, daemon=True).start()
    # Old code waited for the first iteration, for ever: free the CPUs after a while to end it.
    unblock = threading.Timer(20.0, ray.kill, (cpus_taken,))
    unblock.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(exp, tmp_path / "runs", "ray", stream=sys.stdout)
        stopped = time.monotonic()
    finally:
        unblock.cancel()
    assert sent and stopped - sent[0] < 3
    out = capsys.readouterr().out
    assert "interrupted before the first iteration ended; no checkpoint written" in out
    assert "checkpoint saved" not in out
    assert not list((tmp_path / "runs").glob("flaky/*/checkpoints"))
