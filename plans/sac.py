"""SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications"; Box actions):
twin Q critics with Polyak-averaged targets, a tanh-squashed Gaussian actor and automatic
entropy tuning. Per replayed row, with a' ~ pi(.|s_{t+m}) and a~ ~ pi(.|s_t) (reparameterized):

    y_t      = R_t^(m) + gamma^m (1 - d_t) (min_i Q_target_i(s_{t+m}, a') - alpha log pi(a'|s_{t+m}))
    J_Q      = sum_i 1/2 E[w_t (Q_i(s_t, a_t) - y_t)^2]                (w_t: importance weights under PER, else 1)
    J_pi     = E[alpha log pi(a~|s_t) - min_i Q_i(s_t, a~)]
    J_alpha  = E[-log alpha (log pi(a~|s_t) + H_target)]         (H_target = -dim(A) with "auto")

Each loss reaches only its own parameters (the actor's Q is taken with the critics' weights
detached, the temperature's log pi is detached), so one backward pass and one step of the
actor / critic / alpha optimizers is the same as three separate updates. Targets follow the
critics with theta_target <- tau theta + (1 - tau) theta_target after every gradient step.
The plan is DQN's: store and replay streams run concurrently (plans/off_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from flowrl.config import ConfigError
from flowrl.plan import Plan
from flowrl.plans.off_policy import ReplayConfig, build_replay_plan, check_spaces, spaces_by_policy
from flowrl.rollout import WorkerSet


@dataclass
class SACConfig(ReplayConfig):
    lr: float = 3e-4
    train_batch_size: int = 256
    learning_starts: int = 1000
    replay_buffer_capacity: int = 1_000_000
    training_intensity: float | None = 256.0  # rows trained per env step: one minibatch of 256 per step
    tau: float = 0.005
    initial_alpha: float = 1.0
    target_entropy: float | str = "auto"      # "auto": -dim(A)

    def validate(self) -> None:
        super().validate()
        if not self.initial_alpha > 0:
            raise ConfigError("initial_alpha", f"must be > 0, got {self.initial_alpha}")
        if isinstance(self.target_entropy, str) and self.target_entropy != "auto":
            raise ConfigError("target_entropy", f"must be a number or 'auto', got {self.target_entropy!r}")
        if self.model.get("custom_model"):
            raise ConfigError("model.custom_model", "SAC builds its own actor and critics; give hidden and activation")

    def policy_spec(self):
        target = None if self.target_entropy == "auto" else float(self.target_entropy)
        return "SACPolicy", {"initial_alpha": self.initial_alpha, "target_entropy": target}


def soft_q_target(rewards: torch.Tensor, discounts: torch.Tensor, terminateds: torch.Tensor,
                  next_q_target: torch.Tensor, next_logp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """y = r + gamma^m (1 - d) (min_i Q_target_i(s', a') - alpha log pi(a'|s')); `next_q_target`
    has shape (critics, batch)."""
    soft_value = next_q_target.min(0).values - alpha * next_logp
    return rewards + discounts * (1.0 - terminateds.float()) * soft_value


def sac_loss(policy, batch: dict[str, torch.Tensor], config: SACConfig):
    model = policy.model
    alpha = model.log_alpha.exp().detach()
    with torch.no_grad():
        next_actions, next_logp = policy.sample(batch["new_obs"])
        y = soft_q_target(batch["rewards"], batch["discounts"], batch["terminateds"],
                          policy.target_model(batch["new_obs"], next_actions), next_logp, alpha)
    q = model.critic(batch["obs"], batch["actions"])                 # (2, batch)
    td_error = q - y
    critic_loss = 0.5 * (batch["weights"] * td_error ** 2).mean(1).sum()

    actions, logp = policy.sample(batch["obs"])
    q_pi = model.critic(batch["obs"], actions, detach=True).min(0).values
    actor_loss = (alpha * logp - q_pi).mean()

    alpha_loss = -(model.log_alpha * (logp.detach() + policy.target_entropy)).mean()

    total_loss = critic_loss + actor_loss + alpha_loss
    stats = {"critic_loss": critic_loss, "actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha": alpha,
             "entropy": -logp.detach().mean(), "mean_q": q.detach().mean()}
    if config.prioritized_replay:
        stats.update(td_error=td_error.detach().abs().mean(0).cpu().numpy(),
                     batch_indexes=batch["batch_indexes"].cpu().numpy())
    return total_loss, stats


def check_sac_env(config: SACConfig, spaces: dict[str, gym.Space]) -> None:
    from flowrl.envs import EnvError

    check_spaces(config, spaces, "SAC", gym.spaces.Box)
    for whose, policy_spaces in spaces_by_policy(spaces):
        actions = policy_spaces["actions"]
        if not (np.isfinite(actions.low).all() and np.isfinite(actions.high).all()):
            raise EnvError(f"SAC squashes actions into their bounds, which must be finite; {whose} are {actions}")


def build_sac_plan(workers: WorkerSet, config: SACConfig) -> Plan:
    def loss(policy, batch):
        return sac_loss(policy, batch, config)

    # every_steps=1: a Polyak step after every gradient step (each one trains >= 1 row).
    return build_replay_plan(workers, config, loss, "SAC", target_update_every=1)


build_sac_plan.config_class = SACConfig
