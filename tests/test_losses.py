"""Every loss against values worked out by hand (the arithmetic is in the comments), on tiny
fixed tensors and a model whose outputs are fixed; action sampling and greedy actions. (V-trace
with rho_bar != c_bar is in test_returns.py.)"""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.plans.a2c import A2CConfig, a2c_loss
from flowrl.plans.appo import APPOConfig, appo_loss
from flowrl.plans.marwil import MAX_WEIGHT, BCConfig, MARWILConfig, marwil_loss
from flowrl.plans.ppo import PPOConfig, ppo_loss
from flowrl.policy import TorchPolicy

LN2, LN3 = math.log(2), math.log(3)


class FixedOutputs(torch.nn.Module):
    """A model that gives the same dist_inputs and values whatever the observations: one row
    for every observation, or one row per observation when `dist_inputs` has a row each."""

    def __init__(self, dist_inputs, values):
        super().__init__()
        self.dist_inputs = torch.nn.Parameter(torch.tensor(dist_inputs, dtype=torch.float32))
        self.values = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))

    def forward(self, obs):
        if self.dist_inputs.dim() == 1:
            return self.dist_inputs.expand(len(obs), -1) * 1, self.values.expand(len(obs)) * 1
        return self.dist_inputs * 1, self.values * 1


def fixed_policy(action_space, dist_inputs, values):
    policy = TorchPolicy(gym.spaces.Box(-1, 1, (1,)), action_space, seed=0)
    policy.model = FixedOutputs(dist_inputs, values)
    return policy


def num(x):
    return float(x.detach())


def tensors(**columns):
    return {k: torch.as_tensor(np.asarray(v, dtype=np.float32 if k != "actions" else np.int64))
            for k, v in columns.items()}


# ---- PPO ------------------------------------------------------------------------------------------
def ppo_batch():
    # logits [0, 0]: pi(a) = 0.5 for every row; old log-probs chosen so that r = pi / pi_old = 1.5, 0.5, 1.1
    return tensors(obs=np.zeros((3, 1)), actions=[0, 1, 0], action_logp=np.log([0.5 / 1.5, 0.5 / 0.5, 0.5 / 1.1]),
                   advantages=[1.0, -2.0, 3.0], value_targets=[2.0, 2.0, -1.0], vf_preds=[0.5, 3.0, 0.0])


def test_ppo_clipped_surrogate_value_clip_entropy_and_kl_by_hand():
    policy = fixed_policy(gym.spaces.Discrete(2), [[0.0, 0.0]] * 3, [1.0, 2.0, 0.0])
    config = PPOConfig(vf_clip_param=0.3, vf_loss_coeff=0.5, entropy_coeff=0.01)
    loss, stats = ppo_loss(policy, ppo_batch(), config, clip_param=0.2, kl_coeff=0.2)
    # surrogate min(r A, clip(r, 0.8, 1.2) A): min(1.5, 1.2) = 1.2 ; min(-1.0, -1.6) = -1.6 ; min(3.3, 3.3) = 3.3
    policy_loss = -(1.2 - 1.6 + 3.3) / 3
    # values [1, 2, 0], targets [2, 2, -1], old values [0.5, 3, 0], clip 0.3:
    #   unclipped errors (1-2)^2 = 1, 0, (0+1)^2 = 1
    #   clipped values 0.5+0.3 = 0.8, 3-0.3 = 2.7, 0 -> errors 1.44, 0.49, 1 ; the larger of each: 1.44, 0.49, 1
    vf_loss = 0.5 * (1.44 + 0.49 + 1.0) / 3
    # k3 estimator (r - 1) - log r, averaged
    kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 3
    assert num(stats["policy_loss"]) == pytest.approx(policy_loss, abs=1e-6)
    assert num(stats["vf_loss"]) == pytest.approx(vf_loss, abs=1e-6)
    assert num(stats["entropy"]) == pytest.approx(LN2, abs=1e-6)
    assert num(stats["kl"]) == pytest.approx(kl, abs=1e-6)
    assert num(stats["clip_fraction"]) == pytest.approx(2 / 3)  # |r - 1| > 0.2 for rows 0 and 1
    assert num(loss) == pytest.approx(policy_loss + 0.5 * vf_loss - 0.01 * LN2 + 0.2 * kl, abs=1e-6)


def test_ppo_value_loss_without_clipping():
    policy = fixed_policy(gym.spaces.Discrete(2), [[0.0, 0.0]] * 3, [1.0, 2.0, 0.0])
    _, stats = ppo_loss(policy, ppo_batch(), PPOConfig(), clip_param=0.2, kl_coeff=0.0)
    assert num(stats["vf_loss"]) == pytest.approx(0.5 * (1.0 + 0.0 + 1.0) / 3, abs=1e-6)


# ---- A2C ------------------------------------------------------------------------------------------
def test_a2c_loss_by_hand():
    # logits [0, ln 3]: pi = [0.25, 0.75]
    policy = fixed_policy(gym.spaces.Discrete(2), [[0.0, LN3]] * 2, [0.5, 1.0])
    batch = tensors(obs=np.zeros((2, 1)), actions=[1, 0], advantages=[2.0, -1.0], value_targets=[1.5, 0.0])
    loss, stats = a2c_loss(policy, batch, A2CConfig(vf_loss_coeff=0.5, entropy_coeff=0.01))
    policy_loss = -(math.log(0.75) * 2.0 + math.log(0.25) * -1.0) / 2   # -E[log pi(a|s) A]
    vf_loss = 0.5 * ((0.5 - 1.5) ** 2 + (1.0 - 0.0) ** 2) / 2           # = 0.5
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert num(stats["policy_loss"]) == pytest.approx(policy_loss, abs=1e-6)
    assert num(stats["vf_loss"]) == pytest.approx(vf_loss, abs=1e-6)
    assert num(stats["entropy"]) == pytest.approx(entropy, abs=1e-6)
    assert num(loss) == pytest.approx(policy_loss + 0.5 * vf_loss - 0.01 * entropy, abs=1e-6)


# ---- APPO -----------------------------------------------------------------------------------------
def test_appo_weights_the_surrogate_by_pi_over_pi_target_only():
    # pi = 0.5 (logits [0, 0]); target pi_target = 0.4, 0.5; behaviour mu = 0.8, 0.25. The V-trace
    # advantages already hold rho = min(1, pi_target / mu); no second factor pi_target / mu.
    policy = fixed_policy(gym.spaces.Discrete(2), [[0.0, 0.0]] * 2, [1.0, 0.0])
    batch = tensors(obs=np.zeros((2, 1)), actions=[0, 1], action_logp=np.log([0.8, 0.25]),
                    target_logp=np.log([0.4, 0.5]), pg_advantages=[1.0, -1.0], vs=[3.0, 1.0])
    loss, stats = appo_loss(policy, batch, APPOConfig(clip_param=0.2, vf_loss_coeff=0.5, entropy_coeff=0.01))
    # r = pi / pi_target = 1.25, 1.0 -> min(1.25 * 1, 1.2 * 1) = 1.2 ; min(1.0 * -1, 1.0 * -1) = -1
    policy_loss = -(1.2 - 1.0) / 2
    vf_loss = 0.5 * ((1.0 - 3.0) ** 2 + (0.0 - 1.0) ** 2) / 2          # = 1.25
    assert num(stats["policy_loss"]) == pytest.approx(policy_loss, abs=1e-6)
    assert num(stats["vf_loss"]) == pytest.approx(vf_loss, abs=1e-6)
    assert num(stats["clip_fraction"]) == pytest.approx(0.5)
    assert num(loss) == pytest.approx(policy_loss + 0.5 * vf_loss - 0.01 * LN2, abs=1e-6)


def test_appo_gradient_is_the_clipped_ppo_gradient_against_the_target():
    # One row, A = 2, pi_target = 0.5, mu = 0.9, pi(0) = sigmoid(x) with x = 0 -> r = 1 (inside the clip):
    # d/dx of -r A = -A / pi_target * dpi/dx = -2 / 0.5 * 0.25 = -1 (mu plays no part)
    policy = fixed_policy(gym.spaces.Discrete(2), [[0.0, 0.0]], [0.0])
    batch = tensors(obs=np.zeros((1, 1)), actions=[0], action_logp=np.log([0.9]), target_logp=np.log([0.5]),
                    pg_advantages=[2.0], vs=[0.0])
    loss, _ = appo_loss(policy, batch, APPOConfig(entropy_coeff=0.0))
    loss.backward()
    # logits [x0, x1]: dpi0/dx0 = pi0 (1 - pi0) = 0.25, dpi0/dx1 = -0.25
    np.testing.assert_allclose(policy.model.dist_inputs.grad.numpy(), [[-1.0, 1.0]], atol=1e-6)


# ---- MARWIL and BC --------------------------------------------------------------------------------
def marwil_policy():
    policy = fixed_policy(gym.spaces.Discrete(2), [[0.0, LN3], [0.0, LN3]], [1.0, 1.0])  # pi = [0.25, 0.75]
    batch = tensors(obs=np.zeros((2, 1)), actions=[1, 0], value_targets=[2.0, 0.0])
    return policy, batch


def test_marwil_loss_by_hand():
    policy, batch = marwil_policy()
    state = {"sqd_adv_norm": 100.0}
    config = MARWILConfig(input="unused", beta=1.0, vf_coeff=1.0, moving_average_sqd_adv_norm_update_rate=0.01)
    loss, stats = marwil_loss(policy, batch, config, state)
    # A = R - V = [1, -1]; c^2 = 100 + 0.01 (mean(A^2) = 1 - 100) = 99.01
    assert state["sqd_adv_norm"] == pytest.approx(99.01)
    c = math.sqrt(99.01)
    w = [math.exp(1 / c), math.exp(-1 / c)]                               # exp(beta A / c)
    policy_loss = -(w[0] * math.log(0.75) + w[1] * math.log(0.25)) / 2
    vf_loss = 0.5 * (1 + 1) / 2
    assert num(stats["mean_weight"]) == pytest.approx(sum(w) / 2, abs=1e-6)
    assert num(stats["policy_loss"]) == pytest.approx(policy_loss, abs=1e-6)
    assert num(loss) == pytest.approx(policy_loss + 1.0 * vf_loss, abs=1e-6)


def test_marwil_weights_are_capped():
    policy, batch = marwil_policy()
    state = {"sqd_adv_norm": 1e-4}   # c^2 -> 1e-4 + 0.01 (1 - 1e-4) ~ 0.0101: exp(1 / 0.1005) would be ~2e4
    _, stats = marwil_loss(policy, batch, MARWILConfig(input="unused", beta=1.0), state)
    w1 = math.exp(-1 / math.sqrt(state["sqd_adv_norm"]))
    assert num(stats["mean_weight"]) == pytest.approx((MAX_WEIGHT + w1) / 2, abs=1e-6)


def test_bc_loss_is_the_mean_negative_log_likelihood():
    policy, batch = marwil_policy()
    loss, stats = marwil_loss(policy, batch, BCConfig(input="unused"), {"sqd_adv_norm": 100.0})
    assert num(loss) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, abs=1e-6)
    assert set(stats) == {"total_loss", "policy_loss"}


# ---- sampling and greedy actions ------------------------------------------------------------------
PROBS = np.array([0.1, 0.2, 0.3, 0.4])
CHI2_DF3_P001 = 16.27   # chi-square critical value, 3 degrees of freedom, p = 0.001


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_categorical_sampling_follows_non_uniform_probabilities():
    policy = fixed_policy(gym.spaces.Discrete(4), np.log(PROBS), 0.0)
    policy.rng = np.random.default_rng(0)
    n = 40_000
    out = policy.compute_actions(np.zeros((n, 1), np.float32))
    counts = np.bincount(out.actions, minlength=4)
    assert chi_square(counts, PROBS) < CHI2_DF3_P001
    np.testing.assert_allclose(out.logp, np.log(PROBS)[out.actions], atol=1e-6)
    # the statistic does tell distributions apart: the same counts against uniform probabilities fail
    assert chi_square(counts, np.full(4, 0.25)) > 100 * CHI2_DF3_P001


def test_multi_discrete_sampling_follows_each_dimension():
    space = gym.spaces.MultiDiscrete([4, 2])
    policy = fixed_policy(space, np.log(np.concatenate([PROBS, [0.9, 0.1]])), 0.0)
    policy.rng = np.random.default_rng(1)
    out = policy.compute_actions(np.zeros((40_000, 1), np.float32))
    assert chi_square(np.bincount(out.actions[:, 0], minlength=4), PROBS) < CHI2_DF3_P001
    assert chi_square(np.bincount(out.actions[:, 1], minlength=2), np.array([0.9, 0.1])) < 10.83  # df 1, p 0.001
    np.testing.assert_allclose(out.logp, np.log(PROBS)[out.actions[:, 0]] + np.log([0.9, 0.1])[out.actions[:, 1]],
                               atol=1e-5)


def test_greedy_actions_are_the_argmax_and_the_mean():
    obs = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    box_obs = gym.spaces.Box(-10, 10, (3,))
    for space in (gym.spaces.Discrete(5), gym.spaces.Discrete(3, start=2), gym.spaces.MultiDiscrete([3, 4])):
        policy = TorchPolicy(box_obs, space, seed=0)
        torch.nn.init.normal_(policy.model.pi[-1].weight)   # away from the near-uniform initial policy
        logits = policy.model(torch.as_tensor(obs))[0].detach().numpy()
        out = policy.compute_actions(obs, explore=False)
        if isinstance(space, gym.spaces.Discrete):
            assert out.actions.tolist() == logits.argmax(1).tolist()
            assert out.env_actions.tolist() == (logits.argmax(1) + space.start).tolist()
        else:
            expected = np.stack([logits[:, :3].argmax(1), logits[:, 3:].argmax(1)], axis=1)
            assert out.actions.tolist() == expected.tolist()
        assert len(set(np.asarray(out.actions).reshape(len(obs), -1)[:, 0].tolist())) > 1  # not a constant
    policy = TorchPolicy(box_obs, gym.spaces.Box(-0.5, 0.5, (2,)), seed=0)
    torch.nn.init.normal_(policy.model.pi[-1].weight)
    mean = policy.model(torch.as_tensor(obs))[0].detach().numpy()
    out = policy.compute_actions(obs, explore=False)
    # Acting multiplies through numpy, the model through torch: float32 sums in another order
    # differ by a few units in the last place (1.9e-6 on a mean of 6.5 in one run).
    np.testing.assert_allclose(out.actions, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.env_actions, np.clip(mean, -0.5, 0.5), rtol=1e-6, atol=1e-6)
    assert (np.abs(mean) > 0.5).any()   # some were clipped for the env
