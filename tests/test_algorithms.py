"""What the built-in plans do with their settings: `lr_schedule` in every plan with an
optimizer, PPO's adaptive KL coefficient, APPO's target distribution."""

import copy

import numpy as np
import pytest
import torch

from flowrl.config import parse_config, schedule_value
from flowrl.connectors import DatasetWriter
from flowrl.plans import BUILTIN_PLANS
from flowrl.plans.appo import APPOConfig, VTraceTargets
from flowrl.plans.ppo import AdaptKL
from flowrl.rollout import WorkerSet

SCHEDULE = [[0, 1e-3], [1000, 1e-4]]


def run_plan(name, config, env="CartPole-v1", iterations=3):
    spec = BUILTIN_PLANS[name]
    config = parse_config(spec.config_class, {"seed": 0, **config})
    workers = WorkerSet(num_workers=config.num_workers, num_cpus_per_worker=0.1, **config.worker_kwargs(env))
    with spec.build(workers, config) as plan:
        results = [plan.step() for _ in range(iterations)]
    return workers.policy, results


def recorded_dataset(path):
    workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=64, seed=0)
    with DatasetWriter(path) as writer:
        for _ in range(3):
            writer.write(workers.local_worker.sample())
    workers.local_worker.close()
    return str(path)


# ---- lr_schedule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, config", [
    ("PPO", {"num_envs_per_worker": 2, "rollout_fragment_length": 32, "train_batch_size": 128,
             "sgd_minibatch_size": 64, "num_sgd_iter": 1}),
    ("A2C", {"num_envs_per_worker": 4, "rollout_fragment_length": 16}),
    ("A2C", {"num_envs_per_worker": 4, "rollout_fragment_length": 16, "microbatch_size": 32}),
    ("MARWIL", {"train_batch_size": 128, "evaluation_interval": 0, "off_policy_estimation_episodes": 0}),
    ("BC", {"train_batch_size": 128, "evaluation_interval": 0, "off_policy_estimation_episodes": 0}),
])
def test_lr_schedule_sets_the_learning_rate_in_every_synchronous_plan(tmp_path, name, config):
    if name in ("MARWIL", "BC"):
        config = {**config, "input": recorded_dataset(tmp_path / "data")}
    policy, results = run_plan(name, {**config, "lr": 0.5, "lr_schedule": SCHEDULE})
    for result in results:   # each training step ran with the lr of the steps sampled before it
        assert result["lr"] == pytest.approx(schedule_value(SCHEDULE, result["num_env_steps_sampled"], 0.5))
    assert policy.optimizer.param_groups[0]["lr"] == pytest.approx(results[-1]["lr"])
    assert 1e-4 < results[-1]["lr"] < results[0]["lr"] < 1e-3


def test_lr_schedule_sets_the_learning_rate_of_the_appo_learner():
    config = {"num_workers": 1, "num_envs_per_worker": 2, "rollout_fragment_length": 16, "train_batch_size": 64,
              "sgd_minibatch_size": 32, "num_sgd_iter": 1, "lr": 0.5, "lr_schedule": SCHEDULE}
    policy, results = run_plan("APPO", config, iterations=4)
    for result in results:
        # the learner thread trained on steps sampled before this result was taken
        assert schedule_value(SCHEDULE, result["num_env_steps_sampled"], 0.5) <= result["lr"] < 1e-3
    assert policy.optimizer.param_groups[0]["lr"] <= results[-1]["lr"]


# ---- adaptive KL ----------------------------------------------------------------------------------
PPO_SMALL = {"num_envs_per_worker": 2, "rollout_fragment_length": 32, "train_batch_size": 64,
             "sgd_minibatch_size": 64, "num_sgd_iter": 2}


def expected_kl_update(coeff, kl, target):
    return coeff * 1.5 if kl > 2 * target else coeff * 0.5 if kl < 0.5 * target else coeff


@pytest.mark.parametrize("kl_coeff, start", [(None, 0.2), (0.5, 0.5)])
def test_adaptive_kl_starts_from_a_positive_coefficient(kl_coeff, start):
    config = {**PPO_SMALL, "kl_target": 0.01, **({} if kl_coeff is None else {"kl_coeff": kl_coeff})}
    _, results = run_plan("PPO", config, iterations=2)
    assert results[0]["kl_coeff"] == pytest.approx(start)   # the coefficient the first step trained with
    assert results[1]["kl_coeff"] == pytest.approx(expected_kl_update(start, results[0]["kl"], 0.01))


def test_adapt_kl_moves_the_coefficient_by_the_measured_kl():
    state = {"kl_coeff": 0.2}
    adapt = AdaptKL(parse_config(BUILTIN_PLANS["PPO"].config_class, {"kl_target": 0.01}), state)
    adapt({"kl": 0.03})     # > 2 * target: x1.5
    assert state["kl_coeff"] == pytest.approx(0.3)
    adapt({"kl": 0.01})     # within [target / 2, 2 target]: kept
    assert state["kl_coeff"] == pytest.approx(0.3)
    adapt({"kl": 0.001})    # < target / 2: x0.5
    assert state["kl_coeff"] == pytest.approx(0.15)


# ---- APPO's target distribution -------------------------------------------------------------------
def test_appo_target_log_probs_come_wholly_from_the_target_network():
    workers = WorkerSet(env="Pendulum-v1", num_envs_per_worker=1, rollout_fragment_length=16, seed=0)
    policy = workers.policy
    policy.target_model = copy.deepcopy(policy.model).requires_grad_(False)   # as UpdateTargetNetwork does
    batch = workers.local_worker.sample()
    vtrace_targets = VTraceTargets(workers, APPOConfig())
    before = vtrace_targets(batch)["target_logp"]
    with torch.no_grad():
        policy.log_std += 1.0     # the learner's log_std moves on; the target's must not follow
    after = vtrace_targets(batch)["target_logp"]
    np.testing.assert_allclose(after, before, atol=1e-6)
    # and it is the Gaussian of the target's mean and the target's own log_std
    with torch.no_grad():
        mean = policy.target_model(torch.as_tensor(batch["obs"]))[0]
        std = policy.target_model.log_std.exp()
        expected = torch.distributions.Normal(mean, std).log_prob(torch.as_tensor(batch["actions"])).sum(-1)
    np.testing.assert_allclose(before, expected.numpy(), atol=1e-5)
