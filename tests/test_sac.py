"""SAC: the squashed-Gaussian log-probability and the soft Q target against answers worked out
by hand, which parameters each loss reaches, actions in the space's bounds, and the plan end to
end (learning on Pendulum, checkpoints, `flowrl eval`, one-line errors on bad input)."""

import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

import flowrl
from flowrl.cli import main
from flowrl.experiment import load_experiments, run_experiment
from flowrl.plans.sac import SACConfig, sac_loss, soft_q_target
from flowrl.sac_policy import SACPolicy, squashed_gaussian_logp

ROOT = Path(__file__).resolve().parent.parent
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def test_squashed_gaussian_logp_by_hand():
    # Dimension 0: u = 0, N(0, 1), scale 2: log N = -log sqrt(2 pi); 1 - tanh(0)^2 = 1; minus log 2.
    # Dimension 1: u = atanh(0.5), N(0, 0.5), scale 1:
    #   log N = -0.5 (atanh(0.5) / 0.5)^2 - log 0.5 - log sqrt(2 pi); 1 - tanh(u)^2 = 0.75.
    u1 = math.atanh(0.5)
    dim0 = -LOG_SQRT_2PI - math.log(2.0)
    dim1 = -0.5 * (u1 / 0.5) ** 2 - math.log(0.5) - LOG_SQRT_2PI - math.log(0.75)
    logp = squashed_gaussian_logp(torch.tensor([[0.0, u1]]), torch.zeros(1, 2), torch.tensor([[0.0, math.log(0.5)]]),
                                  scale=torch.tensor([2.0, 1.0]))
    assert logp.item() == pytest.approx(dim0 + dim1, abs=1e-5)
    assert dim0 + dim1 == pytest.approx(-1.6120857 - 0.5415837, abs=1e-6)


def test_squashed_gaussian_logp_matches_torchs_transformed_distribution_and_stays_finite():
    from torch.distributions import Normal, TransformedDistribution
    from torch.distributions.transforms import AffineTransform, TanhTransform

    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 3), torch.randn(64, 3).clamp(-2, 1)
    scale, bias = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, -0.5])
    u = mean + log_std.exp() * torch.randn(64, 3)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(bias, scale)])
    expected = dist.log_prob(bias + scale * torch.tanh(u)).sum(-1)
    ours = squashed_gaussian_logp(u, mean, log_std, scale)
    inside = (torch.tanh(u).abs() < 0.99).all(-1)  # where torch's inverse tanh is still exact in float32
    assert torch.allclose(ours[inside], expected[inside], atol=1e-3)
    far = squashed_gaussian_logp(torch.tensor([[30.0]]), torch.tensor([[30.0]]), torch.zeros(1, 1), torch.ones(1))
    assert torch.isfinite(far).all()  # tanh(30) rounds to 1, yet log(1 - tanh^2) = -58.6 exactly


def test_soft_q_target_by_hand():
    # Row 0 continues: y = 1 + 0.99 (min(3, 4) - 0.2 * -1) = 1 + 0.99 * 3.2 = 4.168
    # Row 1 terminated: y = 2
    y = soft_q_target(rewards=torch.tensor([1.0, 2.0]), discounts=torch.tensor([0.99, 0.9801]),
                      terminateds=torch.tensor([False, True]), next_q_target=torch.tensor([[3.0, 5.0], [4.0, 1.0]]),
                      next_logp=torch.tensor([-1.0, 0.5]), alpha=torch.tensor(0.2))
    assert y.tolist() == pytest.approx([4.168, 2.0], abs=1e-6)


def _policy():
    return SACPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2.0, 2.0, (1,)), {"hidden": [16, 16]}, seed=0)


def _batch(n=32):
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(n, 3, generator=g), "new_obs": torch.randn(n, 3, generator=g),
            "actions": torch.rand(n, 1, generator=g) * 4 - 2, "rewards": torch.randn(n, generator=g),
            "terminateds": torch.rand(n, generator=g) < 0.1, "discounts": torch.full((n,), 0.99),
            "weights": torch.ones(n), "batch_indexes": torch.arange(n)}


def test_each_sac_loss_reaches_only_its_own_parameters():
    policy = _policy()
    _, stats = sac_loss(policy, _batch(), SACConfig())
    actor, critic = list(policy.model.actor.parameters()), list(policy.model.critic.parameters())
    alpha = [policy.model.log_alpha]

    def reached(loss, params):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return any(g is not None and g.abs().sum() > 0 for g in grads)

    assert reached(stats["critic_loss"], critic) and not reached(stats["critic_loss"], actor + alpha)
    assert reached(stats["actor_loss"], actor) and not reached(stats["actor_loss"], critic + alpha)
    assert reached(stats["alpha_loss"], alpha) and not reached(stats["alpha_loss"], actor + critic)


def test_temperature_moves_towards_the_target_entropy():
    # With the entropy above the target (-1 for a 1-d action), J_alpha's gradient lowers alpha.
    policy = _policy()
    loss, stats = sac_loss(policy, _batch(), SACConfig())
    assert float(stats["entropy"]) > policy.target_entropy == -1.0
    policy.optimizer.zero_grad()
    loss.backward()
    assert policy.model.log_alpha.grad.item() > 0   # gradient descent lowers log alpha


def test_twin_critics_are_two_independent_networks():
    policy = _policy()
    obs, actions = torch.randn(5, 3), torch.rand(5, 1)
    q = policy.model.critic(obs, actions)
    assert q.shape == (2, 5) and not torch.allclose(q[0], q[1])
    assert torch.equal(policy.target_model(obs, actions), q.detach())  # targets start as a copy


def test_actions_are_scaled_into_the_bounds_and_greedy_is_the_squashed_mean():
    space = gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([3.0, 10.0], np.float32))
    policy = SACPolicy(gym.spaces.Box(-1, 1, (2,)), space, {"hidden": [8]}, seed=0)
    obs = np.random.default_rng(0).standard_normal((2000, 2)).astype(np.float32)
    sampled = policy.compute_actions(obs).env_actions
    assert sampled.shape == (2000, 2) and (sampled >= space.low).all() and (sampled <= space.high).all()
    mean, _ = policy.model.actor(torch.as_tensor(obs))
    expected = np.array([1.0, 5.0]) + np.array([2.0, 5.0]) * np.tanh(mean.detach().numpy())
    assert np.allclose(policy.compute_actions(obs, explore=False).env_actions, expected, atol=1e-5)
    assert set(policy.get_weights()) == set(policy.model.actor.state_dict())  # workers get the actor only


def train(tmp_path, overrides=(), name="sac_pendulum"):
    (exp,) = load_experiments(ROOT / "examples" / f"{name}.yaml", list(overrides), seed=0)
    return run_experiment(exp, tmp_path, "local", quiet=True)


def test_sac_pendulum_learns(tmp_path):
    # Random play scores about -1,200 per episode; stop once the last 20 average -400.
    result = train(tmp_path, [("stop.timesteps_total", 8000), ("stop.episode_return_mean", -400)])
    assert result["episode_return_mean"] >= -400, result["episode_return_mean"]
    assert result["alpha"] < 0.5 and result["num_target_updates"] == result["num_env_steps_trained"] // 256


def test_episode_return_mean_averages_the_last_metrics_num_episodes_for_smoothing():
    from flowrl.operators import StandardMetricsReporting
    from flowrl.plan import Plan
    from flowrl.stream import Stream

    with Plan(Stream.from_iterable([{}]), report=StandardMetricsReporting(num_episodes=2)) as plan:
        plan.ctx.episodes.extend([(-1000.0, 200), (-300.0, 200), (-100.0, 200)])
        result = plan.step()
    assert result["episode_return_mean"] == -200.0 and result["episode_return_min"] == -300.0
    with pytest.raises(ValueError, match="num_episodes"):
        StandardMetricsReporting(num_episodes=101)


def test_checkpoint_resume_and_eval_of_a_sac_run(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"tiny-sac": {
        "env": "Pendulum-v1", "run": "SAC", "stop": {"timesteps_total": 600},
        "config": {"learning_starts": 200, "timesteps_per_iteration": 200, "checkpoint_freq": 1,
                   "model": {"hidden": [16, 16]}, "training_intensity": 64, "seed": 0}}}))
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run_dir = (tmp_path / "runs" / "tiny-sac" / "latest").resolve()
    checkpoint = sorted((run_dir / "checkpoints").glob("checkpoint_*"))[-1]
    target = torch.load(checkpoint / "target_model.pt", weights_only=True)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["param_groups"]) == 3  # actor, critics, alpha

    policy = flowrl.load_policy(run_dir)
    assert isinstance(policy.policy, SACPolicy)
    obs = np.array([1.0, 0.0, 0.5], np.float32)
    mean, _ = policy.policy.model.actor(torch.as_tensor(obs)[None])
    assert policy.compute_action(obs) == pytest.approx(2.0 * np.tanh(mean.detach().numpy()[0]), abs=1e-5)
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0
    assert "greedy episodes on Pendulum-v1" in capsys.readouterr().out

    plan.write_text(plan.read_text().replace("600", "800"))
    assert main(["run", str(plan), "--resume", str(run_dir), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert rows[-1]["timesteps_total"] == 800
    resumed = sorted((run_dir / "checkpoints").glob("checkpoint_*"))[-1]
    assert resumed != checkpoint and set(torch.load(resumed / "target_model.pt", weights_only=True)) == set(target)


class UnboundedActionsEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)

    def reset(self, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


@pytest.mark.parametrize("env, config, key", [
    ("CartPole-v1", {}, "env: SAC needs Box actions"),
    ("tests.test_sac:UnboundedActionsEnv", {}, "env: SAC squashes actions into their bounds, which must be finite"),
    ("Pendulum-v1", {"tau": 2}, "config.tau: must be in (0, 1]"),
    ("Pendulum-v1", {"target_entropy": "high"}, "config.target_entropy: must be a number or 'auto'"),
    ("Pendulum-v1", {"n_step": 0}, "config.n_step: must be >= 1"),
])
def test_bad_sac_input_is_one_line_naming_file_experiment_and_key(tmp_path, capsys, env, config, key):
    plan = tmp_path / "bad.yaml"
    plan.write_text(yaml.safe_dump({"bad-sac": {"env": env, "run": "SAC", "stop": {"timesteps_total": 100},
                                                "config": config}}))
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"flowrl: error: {plan}: experiment 'bad-sac': {key}"), err
    assert not (tmp_path / "runs").exists()
