"""The Python API (flowrl.build, Algorithm.train/save/evaluate, flowrl.restore, flowrl.train) and
`flowrl train`, the seed's one-line command."""

import json
import time

import numpy as np
import pytest
import torch
import yaml

import flowrl
from flowrl.cli import main
from flowrl.experiment import load_experiments, parse_overrides
from flowrl.plans import PPOConfig, build_ppo_plan
from flowrl.rollout import evaluate_policy

# 256 env steps an iteration, 2 epochs of 2 minibatches: 4 Adam steps per iteration.
SMALL = {"train_batch_size": 256, "sgd_minibatch_size": 128, "num_sgd_iter": 2, "num_envs_per_worker": 4,
         "rollout_fragment_length": 32, "seed": 0}


def flat(result):
    """A result record as a metrics.jsonl row names its keys (nested dicts become "a/b")."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_save_and_restore_continue_counters_optimizer_and_schedule(tmp_path):
    config = {**SMALL, "lr_schedule": [[0, 1e-3], [1024, 0.0]]}
    with flowrl.build("PPO", env="CartPole-v1", config=config) as algo:
        results = [algo.train(), algo.train()]
        saved = algo.save(tmp_path / "ckpt")
        optimizer = algo.policy.optimizer.state_dict()
        weights = {k: v.clone() for k, v in algo.policy.model.state_dict().items()}
    assert [(r["training_iteration"], r["timesteps_total"]) for r in results] == [(1, 256), (2, 512)]
    assert sorted(p.name for p in saved.iterdir()) == ["algorithm.json", "model.pt", "optimizer.pt", "progress.json"]
    described = json.loads((saved / "algorithm.json").read_text())
    assert (described["plan"], described["env"], described["name"]) == ("PPO", "CartPole-v1", "cartpole-v1-ppo")
    assert described["config"]["lr_schedule"] == [[0, 1e-3], [1024, 0.0]]
    assert main(["eval", str(saved), "--episodes", "1"]) == 0  # nothing beside it needed

    with flowrl.restore(tmp_path / "ckpt") as algo:
        assert algo.iteration == 2
        restored = algo.policy.optimizer.state_dict()
        assert restored["param_groups"] == optimizer["param_groups"]
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                assert torch.equal(restored["state"][index][key], value)
        assert all(torch.equal(algo.policy.model.state_dict()[k], v) for k, v in weights.items())
        result = algo.train()
        adam_steps = algo.policy.optimizer.state_dict()["state"][0]["step"].item()
    assert (result["training_iteration"], result["timesteps_total"]) == (3, 768)
    # The schedule goes by the restored step count: 1e-3 * (1 - 768/1024); counters from 0 would give 7.5e-4.
    assert result["lr"] == pytest.approx(2.5e-4, rel=1e-9)
    assert adam_steps == optimizer["state"][0]["step"].item() + 4 == 12


def test_a_run_dir_is_the_one_flowrl_run_keeps_and_restores_from_its_config_yaml(tmp_path):
    with flowrl.build("PPO", env="CartPole-v1", config={**SMALL, "checkpoint_freq": 1},
                      output_dir=tmp_path / "runs") as algo:
        results = [algo.train(), algo.train()]
        run_dir = algo.run_dir
    assert run_dir.parent == tmp_path / "runs" / "cartpole-v1-ppo"
    assert (tmp_path / "runs" / "cartpole-v1-ppo" / "latest").resolve() == run_dir.resolve()
    assert {"config.yaml", "metrics.jsonl", "progress.csv", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    rows = rows_of(run_dir)
    assert len(rows) == 2
    for row, result in zip(rows, results):  # the record train() returns is the row metrics.jsonl holds
        assert set(row) == set(flat(result))
        assert {k: row[k] for k in ("training_iteration", "timesteps_total", "episodes_total")} == \
            {k: result[k] for k in ("training_iteration", "timesteps_total", "episodes_total")}
    checkpoint = run_dir / "checkpoints" / "checkpoint_000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.pt", "optimizer.pt", "progress.json"]
    for path in (run_dir, tmp_path / "runs" / "cartpole-v1-ppo", checkpoint):
        with flowrl.restore(path) as algo:
            assert algo.run_dir is None and algo.iteration == 2
            assert algo.config.checkpoint_freq == 1 and algo.config.train_batch_size == 256


def test_compute_single_action_is_greedy_unless_explore():
    with flowrl.build("PPO", env="CartPole-v1", config=SMALL) as algo:
        algo.train()
        rng = np.random.default_rng(0)
        observations = rng.normal(size=(20, 4)).astype(np.float32)
        logits = algo.policy.model(torch.as_tensor(observations))[0].detach().numpy()
        assert [algo.compute_single_action(obs) for obs in observations] == logits.argmax(-1).tolist()
        # Sampling from a near-uniform policy gives both actions of one observation.
        assert {algo.compute_single_action(observations[0], explore=True) for _ in range(50)} == {0, 1}


def test_evaluate_plays_greedy_episodes_and_reports_them():
    with flowrl.build("PPO", env="CartPole-v1", config=SMALL) as algo:
        algo.train()
        summary = algo.evaluate(episodes=3, seed=5)
        returns, lengths = evaluate_policy(algo.policy, "CartPole-v1", {}, 3, seed=5, with_lengths=True)
    assert summary == {"episode_return_mean": np.mean(returns), "episode_return_min": min(returns),
                       "episode_return_max": max(returns), "episode_len_mean": np.mean(lengths), "episodes": 3}


@pytest.mark.parametrize("config, key, message", [
    ({"lrr": 0.1}, "config.lrr", "PPO on CartPole-v1: config.lrr: unknown key; did you mean 'lr'?"),
    ({"lr": -1.0}, "config.lr", "PPO on CartPole-v1: config.lr: must be > 0, got -1.0"),
    ({"num_sgd_iter": "ten"}, "config.num_sgd_iter",
     "PPO on CartPole-v1: config.num_sgd_iter: expected an integer, got 'ten'"),
    ({"lr": {"grid_search": [0.1, 0.01]}}, None,
     "PPO on CartPole-v1: config.lr: {grid_search: ...} is a Tune search space; run it with flowrl.tune"),
])
def test_a_bad_config_raises_naming_the_key(config, key, message):
    error = flowrl.ConfigError if key else flowrl.ExperimentError
    with pytest.raises(error) as info:
        flowrl.build("PPO", env="CartPole-v1", config=config)
    assert str(info.value) == message
    if key:
        assert info.value.key == key


def test_a_bad_stop_key_plan_or_env_raises_naming_it(tmp_path):
    with pytest.raises(flowrl.ConfigError, match=r"stop.timestep_total: unknown stop key; did you mean 'timesteps_"):
        flowrl.train("PPO", env="CartPole-v1", stop={"timestep_total": 5}, output_dir=tmp_path)
    with pytest.raises(flowrl.ExperimentError, match=r"run: unknown plan 'PPOO'; did you mean 'PPO'\?"):
        flowrl.build("PPOO", env="CartPole-v1")
    with pytest.raises(flowrl.ExperimentError, match=r"env: unknown env 'CartPol-v1'; did you mean 'CartPole-v1'\?"):
        flowrl.build("PPO", env="CartPol-v1")
    with pytest.raises(flowrl.ConfigError, match=r"stop: missing"):
        flowrl.train("PPO", env="CartPole-v1", output_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_flowrl_train_runs_to_its_stop_in_a_run_dir(tmp_path, capsys):
    result = flowrl.train("PPO", env="CartPole-v1", config=SMALL, stop={"timesteps_total": 512},
                          output_dir=tmp_path / "runs")
    assert result["stop_reason"] == "timesteps_total 512 >= 512" and result["training_iteration"] == 2
    run_dir = tmp_path / "runs" / "cartpole-v1-ppo" / "latest"
    assert [r["timesteps_total"] for r in rows_of(run_dir)] == [256, 512]
    assert (run_dir / "checkpoints" / "checkpoint_000002" / "model.pt").is_file()
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0
    assert "cartpole-v1-ppo: done at iteration 2" in capsys.readouterr().out


def tiny_ppo(workers, config):
    """A plan function of the user's own."""
    return build_ppo_plan(workers, config)


tiny_ppo.config_class = PPOConfig


def test_a_plan_function_builds_saves_and_restores_when_given_again(tmp_path):
    with flowrl.build(tiny_ppo, env="CartPole-v1", config=SMALL) as algo:
        algo.train()
        saved = algo.save(tmp_path / "ckpt")
    assert json.loads((saved / "algorithm.json").read_text())["plan"].endswith(":tiny_ppo")
    with flowrl.restore(saved, plan=tiny_ppo, config={"lr": 1e-4}) as algo:
        assert algo.iteration == 1 and algo.config.lr == 1e-4
        assert algo.train()["lr"] == 1e-4  # the overriding config is the one trained with


def test_save_into_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with flowrl.build("PPO", env="CartPole-v1", config=SMALL) as algo:
        algo.train()
        with pytest.raises(flowrl.ExperimentError, match="exists and is not a flowrl checkpoint"):
            algo.save(tmp_path)
        with pytest.raises(ValueError, match="no run directory"):
            algo.save()
        first = algo.save(tmp_path / "ckpt")
        algo.train()
        assert algo.save(tmp_path / "ckpt") == first  # an earlier checkpoint is replaced
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert json.loads((first / "progress.json").read_text())["training_iteration"] == 2


def test_the_context_manager_closes_the_ray_workers(ray_session):
    ray = ray_session
    with flowrl.build("PPO", env="CartPole-v1", config={**SMALL, "num_workers": 1}, executor="ray") as algo:
        assert algo.train()["timesteps_total"] == 256
        (handle,) = algo.workers.remote_workers._handles
        assert ray.get(handle.weights_version.remote()) == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.weights_version.remote(), timeout=30)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert ray.is_initialized()  # a Ray it joined is left running


# ---- flowrl train --------------------------------------------------------------------------------
def test_flowrl_train_writes_a_run_dir_named_env_and_plan(tmp_path, capsys):
    config = json.dumps({**SMALL, "checkpoint_freq": 1})
    assert main(["train", "--run", "PPO", "--env", "CartPole-v1", "--config", config, "--stop",
                 "{timesteps_total: 512}", "--output-dir", str(tmp_path), "--quiet"]) == 0
    run_dir = (tmp_path / "cartpole-v1-ppo" / "latest").resolve()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["cartpole-v1-ppo"]
    assert resolved["plan"] == "PPO" and resolved["stop"] == {"timesteps_total": 512}
    assert resolved["config"]["train_batch_size"] == 256
    assert "cartpole-v1-ppo: done at iteration 2 (timesteps_total 512 >= 512)" in capsys.readouterr().out
    # --resume goes on in the same run directory, with the counters of its newest checkpoint.
    assert main(["train", "--run", "PPO", "--env", "CartPole-v1", "--config", config, "--stop",
                 '{"timesteps_total": 768}', "--resume", str(run_dir), "--quiet"]) == 0
    assert [r["timesteps_total"] for r in rows_of(run_dir)] == [256, 512, 768]


def test_numbers_written_as_json_writes_them_are_numbers_in_config_and_plan_files(tmp_path, capsys):
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"; JSON and YAML 1.2 read a number.
    assert main(["train", "--run", "PPO", "--env", "CartPole-v1", "--config", json.dumps({**SMALL, "lr": 1e-4}),
                 "--stop", '{"timesteps_total": 2.56e2}', "--output-dir", str(tmp_path), "--quiet"]) == 0
    resolved = yaml.safe_load(((tmp_path / "cartpole-v1-ppo" / "latest") / "config.yaml").read_text())
    assert resolved["cartpole-v1-ppo"]["config"]["lr"] == 1e-4
    assert resolved["cartpole-v1-ppo"]["stop"] == {"timesteps_total": 256.0}
    plan = tmp_path / "plan.yaml"
    plan.write_text("x:\n  env: CartPole-v1\n  run: PPO\n  stop: {timesteps_total: 1e5}\n  config: {lr: 3e-4}\n")
    (exp,) = load_experiments(plan, parse_overrides(["config.gamma=9.9e-1"]))
    assert (exp.config.lr, exp.config.gamma, exp.stop) == (3e-4, 0.99, {"timesteps_total": 1e5})


@pytest.mark.parametrize("argv, message", [
    (["--config", '{"lr": 0.001'], "--config: not valid JSON or YAML: expected ',' or '}', but got '<stream end>'"),
    (["--config", "[1, 2]"], "--config: expected a mapping such as '{\"lr\": 0.001}', got '[1, 2]'"),
    (["--config", '{"lrr": 0.001}'], "PPO on CartPole-v1: config.lrr: unknown key; did you mean 'lr'?"),
    (["--stop", '{"timestep_total": 5}'],
     "PPO on CartPole-v1: stop.timestep_total: unknown stop key; did you mean 'timesteps_total'?"),
    (["--run", "PPOO"], "PPOO on CartPole-v1: run: unknown plan 'PPOO'; did you mean 'PPO'? (built-in: PPO, A2C, "
                        "APPO, BC, MARWIL, DQN, SAC, or 'package.module:function')"),
    (["--env", "CartPol-v1"], "PPO on CartPol-v1: env: unknown env 'CartPol-v1'; did you mean 'CartPole-v1'?"),
])
def test_flowrl_train_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    args = {"--run": "PPO", "--env": "CartPole-v1", "--stop": "{timesteps_total: 256}"}
    args.update(dict(zip(argv[::2], argv[1::2])))
    argv = ["train", *[x for kv in args.items() for x in kv], "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"flowrl: error: {message}\n" and captured.out == ""
    assert not list(tmp_path.iterdir())
