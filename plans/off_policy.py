"""What DQN and SAC share: the replay settings, their checks, and the plan's shape (RLlib's
off-policy execution plan). Two streams run concurrently on the driver:

    store: ParallelRollouts -> [ExplorationSchedule] -> StoreToReplayBuffer -> LearningRateSchedule
           -> [UpdateWeights] -> [EvaluatePolicy]
    train: Replay -> TrainOneStep -> UpdatePriorities -> UpdateTargetNetwork

`training_intensity` (rows trained per env step sampled, RLlib's meaning) sets how many
replayed minibatches are trained per stored batch. An iteration ends after
`timesteps_per_iteration` env steps sampled (and at least one training step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym

from flowrl.config import CommonConfig, ConfigError, check_schedule, schedule_value
from flowrl.operators import (Concurrently, Gather, LearningRateSchedule, ParallelRollouts, StandardMetricsReporting,
                              TrainOneStep, UpdateTargetNetwork, UpdateWeights)
from flowrl.operators.evaluation import EvaluatePolicy
from flowrl.operators.replay import (Replay, ReplayBuffer, StoreToReplayBuffer, UpdatePriorities, check_replay_memory,
                                     weights_for_training_intensity)
from flowrl.plan import Plan, PlanContext
from flowrl.rollout import WorkerSet
from flowrl.stream import Map, Stream


@dataclass
class ReplayConfig(CommonConfig):
    """Settings of the off-policy plans (RLlib's names)."""

    num_envs_per_worker: int = 1
    rollout_fragment_length: int = 4
    model: dict = field(default_factory=lambda: {"hidden": [256, 256], "activation": "relu"})
    grad_clip: float | None = None
    replay_buffer_capacity: int = 100_000    # rows (transitions)
    n_step: int = 1                          # n-step returns, computed when rows are stored
    tau: float = 1.0                         # each target update: target <- tau * online + (1 - tau) * target
    prioritized_replay: bool = False
    prioritized_replay_alpha: float = 0.6
    prioritized_replay_beta: float = 0.4
    prioritized_replay_beta_schedule: list | None = None  # [[timestep, beta], ...]; overrides the beta above
    prioritized_replay_eps: float = 1e-6
    checkpoint_replay_buffer: bool = False   # save the buffer's rows with each checkpoint (npz, no pickle)
    train_batch_size: int = 256              # rows per replayed minibatch (one gradient step)
    training_intensity: float | None = None  # rows trained per env step sampled; null: one minibatch per stored batch
    learning_starts: int = 1000              # rows in the buffer before training starts
    timesteps_per_iteration: int = 1000      # env steps sampled per result
    evaluation_interval: int = 0             # iterations between greedy evaluations in `env`; 0: none
    evaluation_num_episodes: int = 10
    metrics_num_episodes_for_smoothing: int = 100  # training episodes episode_return_mean averages (1-100)

    def validate(self) -> None:
        super().validate()
        for key in ("replay_buffer_capacity", "n_step", "train_batch_size", "timesteps_per_iteration",
                    "evaluation_num_episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 < self.tau <= 1:
            raise ConfigError("tau", f"must be in (0, 1], got {self.tau}")
        if not 1 <= self.metrics_num_episodes_for_smoothing <= 100:
            raise ConfigError("metrics_num_episodes_for_smoothing",
                              f"must be in [1, 100], got {self.metrics_num_episodes_for_smoothing}")
        for key in ("learning_starts", "evaluation_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.replay_buffer_capacity < self.learning_starts:
            raise ConfigError("replay_buffer_capacity", f"{self.replay_buffer_capacity} rows is less than "
                                                        f"learning_starts ({self.learning_starts}): training would "
                                                        "never start")
        if self.training_intensity is not None and not self.training_intensity > 0:
            raise ConfigError("training_intensity", f"must be > 0 or null, got {self.training_intensity}")
        if not self.prioritized_replay_alpha >= 0:
            raise ConfigError("prioritized_replay_alpha", f"must be >= 0, got {self.prioritized_replay_alpha}")
        if not 0 <= self.prioritized_replay_beta <= 1:
            raise ConfigError("prioritized_replay_beta", f"must be in [0, 1], got {self.prioritized_replay_beta}")
        if not self.prioritized_replay_eps > 0:
            raise ConfigError("prioritized_replay_eps", f"must be > 0, got {self.prioritized_replay_eps}")
        check_schedule("prioritized_replay_beta_schedule", self.prioritized_replay_beta_schedule)
        for _, beta in self.prioritized_replay_beta_schedule or ():
            if not 0 <= beta <= 1:
                raise ConfigError("prioritized_replay_beta_schedule", f"betas must be in [0, 1], got {beta}")

    def rows_per_sample(self) -> int:
        """Rows in each batch the store stream gets: one worker's sample() (remote workers are
        gathered as they finish, one batch each)."""
        return self.num_envs_per_worker * self.rollout_fragment_length


def check_spaces(config: ReplayConfig, spaces: dict[str, gym.Space], plan: str, action_type: type) -> None:
    """Raises EnvError when the env's actions are not of `action_type`, ConfigError when the
    buffer's columns would not fit in memory. Multi-agent spaces ({policy id: spaces}) are
    checked policy by policy, and the buffers of all of them together."""
    from flowrl.envs import EnvError

    for whose, policy_spaces in spaces_by_policy(spaces):
        actions = policy_spaces["actions"]
        if not isinstance(actions, action_type):
            raise EnvError(f"{plan} needs {action_type.__name__} actions; {whose} are {actions}")
    try:
        check_replay_memory(config.replay_buffer_capacity, spaces, config.prioritized_replay)
    except ValueError as e:
        raise ConfigError("replay_buffer_capacity", str(e).removeprefix("replay_buffer_capacity ")) from None


def spaces_by_policy(spaces: dict) -> list[tuple[str, dict[str, gym.Space]]]:
    """(whose, spaces) of each policy for multi-agent spaces ({policy id: spaces}), else of the
    env: what a check of the spaces names in its error.

    >>> box = {"actions": gym.spaces.Box(-1, 1)}
    >>> [whose for whose, _ in spaces_by_policy(box)], [whose for whose, _ in spaces_by_policy({"red": box})]
    (["this env's"], ["policy 'red''s agents'"])
    """
    if "actions" in spaces:
        return [("this env's", spaces)]
    return [(f"policy {pid!r}'s agents'", s) for pid, s in spaces.items()]


class ExplorationSchedule(Map):
    """Sets the learner policy's epsilon from `schedule` ([[timestep, epsilon], ...], piecewise
    linear in the env steps sampled) and reports it; remote workers get it with the weights.
    Multi-agent: every policy with an epsilon (Q-policies, frozen ones too), on the steps
    count_steps_by names; one whose epsilon changed is marked for UpdateWeights to send the
    epsilon (alone, for a policy that did not train meanwhile: a frozen one's weights are not
    resent)."""

    def __init__(self, workers: WorkerSet, schedule: list):
        self.workers, self.schedule = workers, schedule

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, batch):
        epsilon = schedule_value(self.schedule, self.ctx.counters[self.workers.steps_counter], 1.0)
        self.ctx.info["epsilon"] = epsilon
        if not self.workers.is_multi_agent:
            self.workers.policy.epsilon = epsilon
            return batch
        for pid, policy in self.workers.policies.items():
            if getattr(policy, "epsilon", epsilon) != epsilon:
                policy.epsilon = epsilon
                if self.workers.num_remote_workers:
                    self.workers.mark_explored(pid)
        return batch


class ReportReplayMemory(Map):
    """Puts the memory the buffer's columns take, `replay_buffer_bytes`, into the first result
    (the progress line shows it); StoreToReplayBuffer reports the rows stored in every one."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.reported = False

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, batch):
        if not self.reported:
            self.ctx.info["replay_buffer_bytes"] = self.nbytes
            self.reported = True
        return batch


def build_replay_plan(workers: WorkerSet, config: ReplayConfig, loss: Callable, name: str,
                      target_update_every: int, explore: Map | None = None) -> Plan:
    """The two-stream plan around `loss` (which returns per-row `td_error` and
    `batch_indexes` under prioritized replay)."""
    buffer = ReplayBuffer(config.replay_buffer_capacity, n_step=config.n_step, gamma=config.gamma,
                          prioritized=config.prioritized_replay, alpha=config.prioritized_replay_alpha,
                          eps=config.prioritized_replay_eps, seed=config.seed)
    remote = workers.num_remote_workers > 0
    store: Stream = ParallelRollouts(workers, Gather.ASYNC if remote else Gather.SYNC, max_in_flight=1)
    if explore is not None:
        store = store.then(explore)
    nbytes = ReplayBuffer.estimate_nbytes(config.replay_buffer_capacity, workers.spaces, config.prioritized_replay)
    # The learning rate follows the env steps sampled, which change only here: set once per stored
    # batch, not once per replayed one.
    store = (store.then(StoreToReplayBuffer(buffer)).then(ReportReplayMemory(nbytes))
             .then(LearningRateSchedule(workers, config.lr, config.lr_schedule)))
    if remote:
        store = store.then(UpdateWeights(workers, wait=False))
    env = workers.worker_kwargs.get("env")
    if env is not None and config.evaluation_interval:
        every = max(1, config.evaluation_interval * config.timesteps_per_iteration // config.rows_per_sample())
        store = store.then(EvaluatePolicy(workers, env, workers.worker_kwargs.get("env_config"),
                                          config.evaluation_num_episodes, every))

    beta = config.prioritized_replay_beta_schedule or [[0, config.prioritized_replay_beta]]
    train = (Replay(buffer, config.train_batch_size, learning_starts=config.learning_starts, beta_schedule=beta)
             .then(TrainOneStep(workers, loss, grad_clip=config.grad_clip, seed=config.seed))
             .then(UpdatePriorities(buffer))   # a uniform buffer: nothing to update
             .then(UpdateTargetNetwork(workers, target_update_every, config.tau)))

    weights = weights_for_training_intensity(config.training_intensity, config.rows_per_sample(),
                                             config.train_batch_size)
    both = Concurrently({"store": store, "train": train}, output="train", round_robin_weights=weights)
    plan = Plan(both, report=StandardMetricsReporting(config.metrics_num_episodes_for_smoothing),
                min_time_s=config.min_time_s_per_iteration,
                min_env_steps=config.timesteps_per_iteration, steps_counter=workers.steps_counter, name=name)
    plan.replay_buffer = buffer if config.checkpoint_replay_buffer else None
    return plan

