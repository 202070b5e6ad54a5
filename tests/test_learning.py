"""Learning checks for CI: one seed, small budgets. The full table (3 seeds, the issue's
budgets) is benchmarks/learning.py. On the local executor a seeded run is deterministic.

Each bound sits below what seeds 0, 1 and 2 all reach within the budget (measured with
`benchmarks/learning.py --budgets ci`): A2C 463 / 407 at 150k steps (seed 2 stops at 479 after
135k), APPO (2 workers, local executor, examples/appo_cartpole.yaml's 8 epochs) 424 / 439 / 422
at 60k, PPO on Pendulum -289 / -228 / -260 at 100k; random play scores about 22 on CartPole and
-1200 on Pendulum."""

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
    result = train("a2c_cartpole", tmp_path, overrides=[("stop.timesteps_total", 150_000)])
    assert result["episode_return_mean"] >= 350


def test_appo_cartpole_learns_with_a_learner_thread(tmp_path):
    result = train("appo_cartpole", tmp_path, overrides=[("stop.timesteps_total", 60_000)])
    assert result["episode_return_mean"] >= 300
    assert result["num_env_steps_trained"] > 0.5 * result["num_env_steps_sampled"]


def test_ppo_pendulum_improves_with_gaussian_actions(tmp_path):
    result = train("ppo_pendulum", tmp_path, overrides=[("stop.timesteps_total", 100_000)])
    assert result["episode_return_mean"] >= -400


def test_ppo_learns_minatar_breakout_from_image_shaped_observations(tmp_path):
    """examples/ppo_minatar_breakout.yaml: 1.7-2.9 on seeds 0-4 at 80k env steps; random 0.38."""
    pytest.importorskip("minatar")
    result = train("ppo_minatar_breakout", tmp_path)
    assert result["timesteps_total"] >= 80_000 and result["episode_return_mean"] >= 1.0


@pytest.mark.parametrize("name, steps, overrides", [
    ("ppo_halfcheetah", 2048, []),
    ("sac_halfcheetah", 1200, [("config.learning_starts", 1000)]),
])
def test_the_mujoco_examples_train_on_halfcheetah(tmp_path, name, steps, overrides):
    """A smoke run of the files benchmarks/mujoco.py runs at 1M (PPO) and 100k (SAC) env steps:
    one PPO batch of 2,048 rows (counted once, though trained for 10 epochs), or SAC with
    learning_starts brought down to 1,000 and whole minibatches of 256 after it, at most one
    per env step sampled (training_intensity 256)."""
    pytest.importorskip("mujoco")
    result = train(name, tmp_path, overrides=[("stop.timesteps_total", steps), *overrides])
    assert result["timesteps_total"] >= steps
    trained = result["num_env_steps_trained"]
    if name.startswith("ppo"):
        assert trained == 2048
    else:
        assert trained > 0 and trained % 256 == 0 and trained <= 256 * result["timesteps_total"], trained
