"""PPO's kl_target and A2C's microbatch_size multi-agent: a KL coefficient per policy, adapted
from that policy's own KL and kept across a checkpoint; microbatch gradients per policy."""

import pytest
import torch

import flowrl
from flowrl.config import parse_config
from flowrl.operators import ComputeAdvantages, ComputeGradients
from flowrl.operators.train import MultiAgentGradients
from flowrl.planfile import load_experiments
from flowrl.plans import ppo
from flowrl.plans.ppo import AdaptKL, PPOConfig
from flowrl.rollout import WorkerSet

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
POLICIES = ["agent_0", "agent_1"]
MULTIAGENT = {"multiagent": {"policy_mapping": "independent"}, "env_config": {"num_agents": 2}}
PPO_SMALL = {**MULTIAGENT, "num_envs_per_worker": 2, "rollout_fragment_length": 32, "train_batch_size": 64,
             "sgd_minibatch_size": 64, "num_sgd_iter": 2, "kl_target": 0.01, "seed": 0}


def test_each_kl_coefficient_follows_its_own_policys_kl():
    state = {"kl_coeff/a": 0.2, "kl_coeff/b": 0.4}
    adapt = AdaptKL(parse_config(PPOConfig, {"kl_target": 0.01}), state, ["a", "b"])
    adapt({"policy/a/kl": 0.03, "policy/b/kl": 0.001})   # a: > 2 * target, x1.5; b: < target / 2, x0.5
    assert state == pytest.approx({"kl_coeff/a": 0.3, "kl_coeff/b": 0.2})
    adapt({"policy/a/kl": 0.01, "kl": 1.0})              # a within [target / 2, 2 target]; b not trained
    assert state == pytest.approx({"kl_coeff/a": 0.3, "kl_coeff/b": 0.2})
    adapt({"policy/a/kl": 0.004, "policy/b/kl": 0.021})
    assert state == pytest.approx({"kl_coeff/a": 0.15, "kl_coeff/b": 0.3})


def test_ppo_trains_each_policy_with_its_own_kl_coefficient_and_a_checkpoint_keeps_them(tmp_path, monkeypatch):
    used = {}   # policy -> the coefficients its losses got
    loss = ppo.ppo_loss

    def recording_loss(policy, batch, config, clip_param, kl_coeff):
        used.setdefault(id(policy), set()).add(kl_coeff)
        return loss(policy, batch, config, clip_param, kl_coeff)

    monkeypatch.setattr(ppo, "ppo_loss", recording_loss)
    with flowrl.build("PPO", env=CARTPOLE, config=PPO_SMALL) as algo:
        first = algo.train()
        algo.plan.state["kl_coeff/agent_1"] = 0.7   # apart from agent_0's, to see whose loss gets which
        used.clear()
        second = algo.train()
        policies = algo.workers.policies
        assert used == {id(policies["agent_0"]): {second["policy/agent_0/kl_coeff"]}, id(policies["agent_1"]): {0.7}}
        saved = dict(algo.plan.state)
        algo.save(tmp_path / "ckpt")
    assert "kl_coeff" not in first and "kl_coeff" not in saved
    for pid in POLICIES:
        assert first[f"policy/{pid}/kl_coeff"] == pytest.approx(0.2)   # RLlib's start, kl_coeff being 0
        kl = first[f"policy/{pid}/kl"]
        start = 0.7 if pid == "agent_1" else 0.2 * (1.5 if kl > 0.02 else 0.5 if kl < 0.005 else 1.0)
        kl = second[f"policy/{pid}/kl"]
        expected = start * (1.5 if kl > 0.02 else 0.5 if kl < 0.005 else 1.0)
        assert saved[f"kl_coeff/{pid}"] == pytest.approx(expected)
    with flowrl.restore(tmp_path / "ckpt") as algo:
        assert {k: algo.plan.state[k] for k in saved} == pytest.approx(saved)
        resumed = algo.train()
    for pid in POLICIES:   # the coefficient the resumed step trained with
        assert resumed[f"policy/{pid}/kl_coeff"] == pytest.approx(saved[f"kl_coeff/{pid}"])


def test_microbatch_gradients_of_each_policy_equal_its_full_batch_gradient():
    workers = WorkerSet(env=CARTPOLE, env_config={"num_agents": 2}, num_envs_per_worker=2,
                        rollout_fragment_length=12, seed=0, multiagent={"policy_mapping": "independent"})
    batch = ComputeAdvantages()(workers.local_worker.sample())

    def mean_loss(policy, b):
        loss = ((policy.model(b["obs"])[1] - b["value_targets"]) ** 2).mean()
        return loss, {"loss": loss}

    full = ComputeGradients(workers, mean_loss)(batch)
    micro = ComputeGradients(workers, mean_loss, microbatch_size=5)(batch)
    assert isinstance(micro, MultiAgentGradients) and micro.env_steps == batch.env_steps
    assert sorted(micro.policy_gradients) == POLICIES
    for pid in POLICIES:
        rows = len(batch[pid])
        assert rows > 5 and micro.policy_gradients[pid].num_rows == rows
        for a, b in zip(micro.policy_gradients[pid].grads, full.policy_gradients[pid].grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a2c_microbatches_step_every_policy_with_its_own_optimizer():
    config = {**MULTIAGENT, "num_envs_per_worker": 2, "rollout_fragment_length": 16, "microbatch_size": 8,
              "seed": 0}
    with flowrl.build("A2C", env=CARTPOLE, config=config) as algo:
        policies = algo.workers.policies
        before = {pid: policies[pid].get_weights() for pid in POLICIES}
        results = [algo.train() for _ in range(3)]
        for pid in POLICIES:
            after = policies[pid].get_weights()
            assert any(not torch.equal(before[pid][k], after[k]) for k in after), pid
            assert policies[pid].optimizer.state, pid   # Adam's moments: its own optimizer stepped
    last = results[-1]
    for pid in POLICIES:
        assert {f"policy/{pid}/{k}" for k in ("total_loss", "policy_loss", "vf_loss", "entropy")} <= set(last)
        assert last[f"policy/{pid}/weights_version"] == 3
    assert "total_loss" not in last
    assert last["num_env_steps_trained"] == 3 * 2 * 16
    assert last["num_agent_steps_trained"] > last["num_env_steps_trained"]
    assert sum(last[f"policy/{pid}/num_agent_steps_trained"] for pid in POLICIES) == last["num_agent_steps_trained"]


def test_a_plan_file_with_these_keys_and_multiagent_is_accepted(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
ppo:
  env: {CARTPOLE}
  run: PPO
  stop: {{timesteps_total: 100}}
  config: {{kl_target: 0.01, multiagent: {{policy_mapping: independent}}}}
a2c:
  env: {CARTPOLE}
  run: A2C
  stop: {{timesteps_total: 100}}
  config: {{microbatch_size: 16, multiagent: {{policy_mapping: shared}}}}
""")
    ppo_exp, a2c_exp = load_experiments(plan)
    assert ppo_exp.config.kl_target == 0.01 and a2c_exp.config.microbatch_size == 16
