"""Learning checks for CI: one seed, small budgets. The full table (3 seeds, the issue's
budgets) is benchmarks/learning.py. On the local executor a seeded run is deterministic."""

from pathlib import Path

import pytest

from flowrl.experiment import load_experiments, run_experiment

ROOT = Path(__file__).resolve().parent.parent


def train(name, tmp_path, executor="local", overrides=()):
    (exp,) = load_experiments(ROOT / "examples" / f"{name}.yaml", list(overrides), seed=0)
    return run_experiment(exp, tmp_path, executor, quiet=True)


def test_ppo_cartpole_reaches_475_within_100k_steps(tmp_path):
    result = train("ppo_cartpole", tmp_path)
    assert result["episode_return_mean"] >= 475 and result["timesteps_total"] <= 100_000


def test_a2c_cartpole_learns(tmp_path):
    result = train("a2c_cartpole", tmp_path, overrides=[("stop.timesteps_total", 60_000)])
    assert result["episode_return_mean"] >= 150


def test_appo_cartpole_learns_with_a_learner_thread(tmp_path):
    result = train("appo_cartpole", tmp_path, overrides=[("stop.timesteps_total", 40_000)])
    assert result["episode_return_mean"] >= 100
    assert result["num_env_steps_trained"] > 0.5 * result["num_env_steps_sampled"]


def test_ppo_pendulum_improves_with_gaussian_actions(tmp_path):
    result = train("ppo_pendulum", tmp_path, overrides=[("stop.timesteps_total", 40_000)])
    assert result["episode_return_mean"] >= -1000  # random play scores about -1200
