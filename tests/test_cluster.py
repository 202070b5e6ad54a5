"""Running on a Ray cluster of two nodes on this machine (flowrl.testing.local_cluster: a head and
a second node, each its own raylet with 2 logical CPUs): workers spread over the nodes, a lost
node's worker replaced on the other, user code shipped to the workers with a runtime_env, Ray
Client refused; and APPO's policy-lag metrics.

The cluster is this module's own Ray: the session's (tests/conftest.py) is shut down first, and
this module leaves Ray shut down, so the next test that asks for `ray_session` starts it again.
"""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

import flowrl
from flowrl.cli import main
from flowrl.cluster import DEFAULT_EXCLUDES, check_cluster_config, runtime_env_for
from flowrl.config import CommonConfig, ConfigError, parse_config
from flowrl.executors import ActorPlacementError, find_run_error
from flowrl.testing import local_cluster

TINY_APPO = {"num_workers": 2, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 4, "rollout_fragment_length": 32,
             "train_batch_size": 256, "sgd_minibatch_size": 128, "num_sgd_iter": 1, "seed": 0}


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.shutdown()  # the session's one-node Ray, if a test before started it
    with local_cluster(num_nodes=2, num_cpus=2) as c:
        yield c
    # local_cluster left Ray shut down in this process: the next ray_session starts it again.


@pytest.fixture(scope="module")
def joined(cluster):
    """This process joined to the cluster, as `flowrl run --address` joins it; Algorithms built
    with executor="ray" use it."""
    import ray

    from flowrl.executors import join_cluster

    join_cluster(cluster.address, 30, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()


def node_ids(algo) -> list[str]:
    return algo.workers.remote_workers.foreach("node_id")


# ---- addresses ---------------------------------------------------------------------------
def test_a_ray_client_address_is_refused_with_one_line(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"tiny": {"env": "CartPole-v1", "run": "PPO", "stop": {"timesteps_total": 256}}}))
    code = main(["run", str(plan), "--address", "ray://10.0.0.5:10001", "--output-dir", str(tmp_path / "runs")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "flowrl: error: cannot join the Ray cluster at ray://10.0.0.5:10001: Ray Client (ray://) is not supported "
        "(the learner runs in this process, and every sampled batch and weight update would pass through the "
        "client's proxy); on a machine of the cluster give the GCS address, --address 10.0.0.5:6379 (the one `ray "
        "start --head` prints) or --address auto, or submit the run as a Ray Job: ray job submit --address "
        "http://10.0.0.5:8265 --working-dir . -- flowrl run PLAN.yaml --address auto"]
    assert not (tmp_path / "runs").exists()


# ---- placement ---------------------------------------------------------------------------
def test_strict_spread_needs_a_node_per_worker(joined):
    config = dict(TINY_APPO, worker_placement_strategy="STRICT_SPREAD")
    with flowrl.build("APPO", env="CartPole-v1", config=config, executor="ray") as algo:
        algo.train()
        assert len(set(node_ids(algo))) == 2
    config.update(num_workers=3, actor_start_timeout_s=2.0)
    with flowrl.build("APPO", env="CartPole-v1", config=config, executor="ray") as algo:
        with pytest.raises(Exception) as error:
            algo.train()  # the workers start with the first iteration
    assert isinstance(find_run_error(error.value), ActorPlacementError)
    assert str(find_run_error(error.value)) == (
        "3 RolloutWorker actors (0.5 CPU each) not placed STRICT_SPREAD after 2 s: the cluster has 2 node(s) and "
        "STRICT_SPREAD needs a node with room for each actor; choose another worker_placement_strategy, or raise "
        "actor_start_timeout_s")


# ---- user code ---------------------------------------------------------------------------
ENV_MODULE = '''
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    """Walk right to the end of a corridor of 5 cells."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.x = max(0, self.x + (1 if action == 1 else -1))
        done = self.x >= 4
        return np.array([self.x / 4], np.float32), float(done), done, self.x == 0 and action == 0, {}
'''


def start_flowrl_run(cluster, root, *args):
    """`flowrl run` of a plan on `mymod:Corridor`, a module that exists only in root/lib: on the
    driver's PYTHONPATH, but neither in its current directory (which Ray would put on the
    sys.path of workers on this machine) nor anywhere the cluster's nodes look."""
    lib, work = root / "lib", root / "work"
    lib.mkdir(parents=True)
    work.mkdir()
    (lib / "mymod.py").write_text(textwrap.dedent(ENV_MODULE))
    plan = {"corridor": {"env": "mymod:Corridor", "run": "APPO", "stop": {"training_iteration": 2},
                         "config": dict(TINY_APPO, num_envs_per_worker=2)}}
    (work / "plan.yaml").write_text(yaml.safe_dump(plan))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(lib)
    return subprocess.Popen([sys.executable, "-m", "flowrl.cli", "run", "plan.yaml", "--address", cluster.address,
                             "--quiet", *args], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_user_code_reaches_the_workers_through_the_runtime_env(cluster, tmp_path):
    # Side by side (each mostly waits on start-up): with the runtime_env flowrl gives the job, and
    # without one (`runtime_env: {}`), as on a real cluster, to show the test would fail without.
    shipped = start_flowrl_run(cluster, tmp_path / "shipped")
    not_shipped = start_flowrl_run(cluster, tmp_path / "not_shipped", "--set", "config.runtime_env={}")
    out, err = shipped.communicate(timeout=120)
    _, err_not_shipped = not_shipped.communicate(timeout=120)
    assert shipped.returncode == 0, err
    assert "corridor: done at iteration 2" in out
    assert not_shipped.returncode == 2, err_not_shipped
    errors = [line for line in err_not_shipped.splitlines() if line.startswith("flowrl: error:")]
    assert len(errors) == 1 and "Traceback" not in err_not_shipped, err_not_shipped
    assert "could not start" in errors[0] and "No module named 'mymod'" in errors[0]


def test_the_runtime_env_ships_where_user_modules_were_imported_from(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "pkg").mkdir(parents=True)
    (tmp_path / "a" / "envs_here.py").write_text("class E: ...\n")
    (tmp_path / "b" / "pkg" / "__init__.py").write_text("class Net: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    config = parse_config(CommonConfig, {"model": {"custom_model": "pkg:Net"}})
    assert runtime_env_for("envs_here:E", config, "PPO") == {
        "working_dir": str(tmp_path / "a"), "py_modules": [str(tmp_path / "b" / "pkg")], "excludes": DEFAULT_EXCLUDES}
    # The driver of a Ray Job: `ray job submit --working-dir` shipped the code (and Ray refuses a second working_dir).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert runtime_env_for("envs_here:E", config, "PPO") is None
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    # Built-in envs and plans, and installed packages (flowrl's test envs), need nothing shipped.
    assert runtime_env_for("CartPole-v1", parse_config(CommonConfig, {}), "PPO") is None
    assert runtime_env_for("flowrl.testing_envs:SleepyCartPole", parse_config(CommonConfig, {}), "PPO") is None
    assert runtime_env_for("gymnasium.envs.classic_control:CartPoleEnv", parse_config(CommonConfig, {}), "PPO") is None


def test_a_configured_runtime_env_replaces_the_automatic_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    given = parse_config(CommonConfig, {"runtime_env": {"py_modules": ["src"], "excludes": ["*.ckpt"],
                                                        "env_vars": {"OMP_NUM_THREADS": "1"}}})
    assert runtime_env_for("CartPole-v1", given, "PPO") == {
        "py_modules": [str(tmp_path / "src")], "excludes": DEFAULT_EXCLUDES + ["*.ckpt"],
        "env_vars": {"OMP_NUM_THREADS": "1"}}
    assert runtime_env_for("CartPole-v1", parse_config(CommonConfig, {"runtime_env": {}}), "PPO") is None
    missing = parse_config(CommonConfig, {"runtime_env": {"working_dir": "nowhere"}})
    with pytest.raises(ConfigError, match=r"^config.runtime_env.working_dir: nowhere: no such file or directory$"):
        runtime_env_for("CartPole-v1", missing, "PPO")


@pytest.mark.parametrize("strategy, runtime_env, message", [
    ("SPREAD_OUT", None, "worker_placement_strategy: must be one of SPREAD, DEFAULT, PACK, STRICT_PACK, "
                         "STRICT_SPREAD, got 'SPREAD_OUT'"),
    ("SPREAD", {"workdir": "."}, "runtime_env.workdir: unknown key; did you mean 'working_dir'? (flowrl passes on "
                                 "working_dir, py_modules, excludes, env_vars, pip)"),
    ("SPREAD", {"py_modules": "src"}, "runtime_env.py_modules: expected a list, got 'src'"),
    ("SPREAD", {"env_vars": {"N": 1}}, "runtime_env.env_vars: expected strings, got {'N': 1}"),
])
def test_bad_cluster_settings_are_refused_naming_the_key(strategy, runtime_env, message):
    with pytest.raises(ConfigError) as error:
        check_cluster_config(strategy, runtime_env)
    assert f"{error.value.key}: {error.value.message}" == message


# ---- APPO's policy lag -------------------------------------------------------------------
def test_appo_results_report_the_policy_lag():
    with flowrl.build("APPO", env="CartPole-v1", config=dict(TINY_APPO, num_cpus_per_worker=1.0)) as algo:
        results = [algo.train() for _ in range(6)]
        updates = algo.policy.weights_version
    for result in results:
        assert isinstance(result["max_policy_lag"], int)
        assert 0 <= result["mean_policy_lag"] <= result["max_policy_lag"]
        assert result["max_policy_lag"] < updates  # a row lags at most every update made before it was trained


# ---- a node lost mid-run (last: it takes the second node away) ---------------------------------
def test_workers_spread_over_both_nodes_and_a_lost_nodes_worker_is_replaced(joined):
    cluster = joined
    head = cluster.head_node.node_id
    (second,) = cluster.worker_nodes
    # 0.5 CPU each: Ray's default placement would put both on the driver's node, the head.
    with flowrl.build("APPO", env="CartPole-v1", config=TINY_APPO, executor="ray") as algo:
        algo.train()
        assert sorted(node_ids(algo)) == sorted([head, second.node_id])
        # The second node goes away while both workers have sample() calls in flight.
        cluster.remove_node(second)
        deadline = time.monotonic() + 60
        result = algo.train()
        while result["num_actor_restarts"] == 0 and time.monotonic() < deadline:
            result = algo.train()
        assert result["num_actor_restarts"] == 1
        sampled = result["timesteps_total"]
        for _ in range(3):
            result = algo.train()
        assert node_ids(algo) == [head, head]
        assert result["num_actor_restarts"] == 1
        assert result["timesteps_total"] > sampled
        assert np.isfinite(result["total_loss"])
