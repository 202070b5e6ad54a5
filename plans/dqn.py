"""DQN (Mnih et al. 2015, "Human-level control through deep reinforcement learning") with the
improvements RLlib's DQN has by default: double Q-learning (van Hasselt et al. 2016), a dueling
head (Wang et al. 2016), n-step targets and prioritized replay (Schaul et al. 2016). The seed's
"simple Q-function loss", per replayed row with m = the steps summed (1..n):

    a*    = argmax_a Q(s_{t+m}, a)        (double Q: the online network picks, the target scores)
    y_t   = R_t^(m) + gamma^m (1 - d_t) Q_target(s_{t+m}, a*)
    delta = Q(s_t, a_t) - y_t
    L     = E[w_t huber(delta)]           (w_t: importance weights under prioritized replay, else 1)

The buffer gives R_t^(m) as `rewards`, gamma^m as `discounts` and d_t as `terminateds`.
Workers act epsilon-greedily, epsilon following `exploration_schedule` in env steps sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import torch

from flowrl.config import ConfigError, check_schedule
from flowrl.plan import Plan
from flowrl.plans.off_policy import ExplorationSchedule, ReplayConfig, build_replay_plan, check_spaces
from flowrl.rollout import WorkerSet


@dataclass
class DQNConfig(ReplayConfig):
    num_envs_per_worker: int = 8
    rollout_fragment_length: int = 4
    lr: float = 5e-4
    grad_clip: float | None = 10.0
    train_batch_size: int = 64
    replay_buffer_capacity: int = 50_000
    learning_starts: int = 1000
    training_intensity: float | None = 16.0  # rows trained per env step sampled
    target_network_update_freq: int = 8_000  # trained env steps (rows) between target network updates
    exploration_schedule: list = field(default_factory=lambda: [[0, 1.0], [10_000, 0.02]])  # [[timestep, epsilon]]
    double_q: bool = True
    dueling: bool = True
    evaluation_interval: int = 2             # iterations (timesteps_per_iteration env steps) between evaluations

    def validate(self) -> None:
        super().validate()
        if self.target_network_update_freq < 1:
            raise ConfigError("target_network_update_freq", f"must be >= 1, got {self.target_network_update_freq}")
        check_schedule("exploration_schedule", self.exploration_schedule)
        for _, epsilon in self.exploration_schedule:
            if not 0 <= epsilon <= 1:
                raise ConfigError("exploration_schedule", f"epsilons must be in [0, 1], got {epsilon}")

    def policy_spec(self):
        return "QPolicy", {"dueling": self.dueling, "epsilon": float(self.exploration_schedule[0][1])}


def huber(x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Quadratic within delta of 0, linear outside (Huber 1964): the clipped error of Mnih et al."""
    return torch.where(x.abs() <= delta, 0.5 * x ** 2, delta * (x.abs() - 0.5 * delta))


def q_learning_loss(q_values: torch.Tensor, actions: torch.Tensor, q_next_online: torch.Tensor | None,
                    q_next_target: torch.Tensor, rewards: torch.Tensor, discounts: torch.Tensor,
                    terminateds: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the per-row TD error delta from Q-values of shape (batch, actions).
    `q_next_online` is Q(s', .) of the online network for double Q, None for plain DQN (the
    target network both picks and scores a*)."""
    q_taken = q_values.gather(1, actions.long().unsqueeze(1)).squeeze(1)              # Q(s_t, a_t)
    with torch.no_grad():
        a_star = (q_next_online if q_next_online is not None else q_next_target).argmax(1, keepdim=True)
        q_next = q_next_target.gather(1, a_star).squeeze(1)                         # Q_target(s', a*)
        y = rewards + discounts * (1.0 - terminateds.float()) * q_next
    td_error = q_taken - y
    loss = (weights * huber(td_error)).mean()
    return loss, td_error.detach()


def dqn_loss(policy, batch: dict[str, torch.Tensor], config: DQNConfig):
    q_values = policy.model(batch["obs"])
    with torch.no_grad():
        q_next_target = policy.target_model(batch["new_obs"])
        q_next_online = policy.model(batch["new_obs"]) if config.double_q else None
    loss, td_error = q_learning_loss(q_values, batch["actions"], q_next_online, q_next_target, batch["rewards"],
                                     batch["discounts"], batch["terminateds"], batch["weights"])
    stats = {"loss": loss, "mean_q": q_values.detach().max(1).values.mean(), "mean_td_error": td_error.abs().mean()}
    if config.prioritized_replay:
        stats.update(td_error=td_error.cpu().numpy(), batch_indexes=batch["batch_indexes"].cpu().numpy())
    return loss, stats


def check_dqn_env(config: DQNConfig, spaces: dict[str, gym.Space]) -> None:
    check_spaces(config, spaces, "DQN", gym.spaces.Discrete)


def build_dqn_plan(workers: WorkerSet, config: DQNConfig) -> Plan:
    def loss(policy, batch):
        return dqn_loss(policy, batch, config)

    return build_replay_plan(workers, config, loss, "DQN", config.target_network_update_freq,
                             explore=ExplorationSchedule(workers, config.exploration_schedule))


build_dqn_plan.config_class = DQNConfig
