"""One plan, two learners: a policy that learns with PPO and another with DQN, from the same
rollouts (the two-trainer workflow of the RLlib Flow paper). The rollout stream fans out:

    ppo:   SelectPolicies -> ConcatBatches -> ComputeAdvantages -> StandardizeFields -> TrainOneStep(ppo_loss)
    store: SelectPolicies -> ExplorationSchedule -> StoreToReplayBuffer
    dqn:   Replay -> TrainOneStep(dqn_loss) -> UpdatePriorities -> UpdateTargetNetwork

and `Concurrently` runs the three, then LearningRateSchedule and UpdateWeights. Each policy's `plan`
(config.multiagent.policies.<name>.plan) picks its policy class (PPO: actor-critic, DQN: a
Q-network) and the branch that trains it. Run it with `flowrl run examples/ppo_dqn_multiagent.yaml`
(from the repository root), or from Python:

    flowrl.build("examples.ppo_dqn_multiagent:build_plan", env="flowrl.testing_envs:multi_agent_cartpole",
                 config={"env_config": {"num_agents": 2}, "multiagent": {
                     "policies": {"ppo_policy": {"plan": "PPO"}, "dqn_policy": {"plan": "DQN"}},
                     "policy_mapping": {"agent_0": "ppo_policy", "agent_1": "dqn_policy"}}})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flowrl import Plan
from flowrl.config import CommonConfig, ConfigError, parse_config
from flowrl.multi_agent import parse_multiagent, policies_of_plan
from flowrl.operators import (ComputeAdvantages, ConcatBatches, Concurrently, LearningRateSchedule, ParallelRollouts,
                              Replay, ReplayBuffer, SelectPolicies, StandardizeFields, StandardMetricsReporting,
                              StoreToReplayBuffer, TrainOneStep, UpdatePriorities, UpdateTargetNetwork, UpdateWeights,
                              weights_for_training_intensity)
from flowrl.plans.dqn import DQNConfig, dqn_loss
from flowrl.plans.off_policy import ExplorationSchedule
from flowrl.plans.ppo import PPOConfig, ppo_loss
from flowrl.stream import Map


@dataclass
class PPODQNConfig(CommonConfig):
    """The run's settings (rollouts, gamma, seed; each policy's model and lr under
    multiagent.policies), and each learner's own: `ppo` takes PPOConfig's keys, `dqn` DQNConfig's."""

    ppo: dict = field(default_factory=dict)
    dqn: dict = field(default_factory=dict)
    USED = {"ppo": ("train_batch_size", "sgd_minibatch_size", "num_sgd_iter", "lambda_", "clip_param",
                    "vf_clip_param", "vf_loss_coeff", "entropy_coeff", "kl_coeff"),
            "dqn": ("train_batch_size", "replay_buffer_capacity", "learning_starts", "training_intensity", "n_step",
                    "target_network_update_freq", "exploration_schedule", "double_q", "prioritized_replay",
                    "prioritized_replay_alpha", "prioritized_replay_beta", "prioritized_replay_beta_schedule",
                    "prioritized_replay_eps")}   # the learners' keys this plan reads

    def learner(self, config_class: type, key: str):
        """PPOConfig / DQNConfig: the run's common settings plus those under `key`."""
        common = {f.name for f in dataclasses.fields(CommonConfig)}
        for name in getattr(self, key):
            if name in common:
                raise ConfigError(f"{key}.{name}", "is a setting of the whole run (or of a policy, under "
                                                   "multiagent.policies): give it at the top level")
            if name not in self.USED[key] and name in {f.name for f in dataclasses.fields(config_class)}:
                raise ConfigError(f"{key}.{name}", f"is not used by this plan (it reads {', '.join(self.USED[key])})")
        shared = {f: getattr(self, f) for f in common}
        return parse_config(config_class, {**shared, **getattr(self, key)}, prefix=key)

    def validate(self) -> None:
        super().validate()
        self.learner(PPOConfig, "ppo")
        self.learner(DQNConfig, "dqn")
        if self.count_steps_by != "env_steps":
            raise ConfigError("count_steps_by", "must be env_steps: the branches are paced in env steps")
        policies = parse_multiagent(self.multiagent).policies if self.multiagent is not None else None
        plans = sorted({str(settings.get("plan")) for settings in (policies or {}).values()})
        if plans != ["DQN", "PPO"]:
            raise ConfigError("multiagent.policies", f"every policy needs plan: PPO or plan: DQN, and each plan a "
                                                     f"policy (this plan trains both side by side); got {plans}")


class LatestStats(Map):
    """Each learner's newest statistics in every result (the stream yields them in turns)."""

    def __init__(self):
        self.stats: dict = {}

    def __call__(self, stats: dict) -> dict:
        self.stats.update(stats)
        return dict(self.stats)


def build_plan(workers, config: PPODQNConfig) -> Plan:
    ppo, dqn = config.learner(PPOConfig, "ppo"), config.learner(DQNConfig, "dqn")
    ppo_policies, dqn_policies = policies_of_plan(config.multiagent, "PPO"), policies_of_plan(config.multiagent, "DQN")
    # Pace: one PPO batch is `joined` rollouts; the store stream takes as many, DQN trains
    # training_intensity rows per env step of them.
    rollout = max(workers.num_remote_workers, 1) * config.num_envs_per_worker * config.rollout_fragment_length
    joined = -(-ppo.train_batch_size // rollout)
    replays = weights_for_training_intensity(dqn.training_intensity, rollout, dqn.train_batch_size)["train"]
    to_ppo, to_dqn = ParallelRollouts(workers).fan_out(2, max_lag=joined + 1)

    ppo_train = (to_ppo.then(SelectPolicies(ppo_policies))
                 .then(ConcatBatches(ppo.train_batch_size))
                 .then(ComputeAdvantages(ppo.gamma, ppo.lambda_))
                 .then(StandardizeFields(["advantages"]))
                 .then(TrainOneStep(workers, lambda p, b: ppo_loss(p, b, ppo, ppo.clip_param, ppo.kl_coeff),
                                    ppo.num_sgd_iter, ppo.sgd_minibatch_size, ppo.grad_clip, seed=ppo.seed)))
    buffer = ReplayBuffer(dqn.replay_buffer_capacity, dqn.n_step, dqn.gamma, dqn.prioritized_replay,
                          dqn.prioritized_replay_alpha, dqn.prioritized_replay_eps, seed=dqn.seed)
    dqn_store = (to_dqn.then(SelectPolicies(dqn_policies))
                 .then(ExplorationSchedule(workers, dqn.exploration_schedule))
                 .then(StoreToReplayBuffer(buffer)))
    beta = dqn.prioritized_replay_beta_schedule or [[0, dqn.prioritized_replay_beta]]
    dqn_train = (Replay(buffer, dqn.train_batch_size, learning_starts=dqn.learning_starts, beta_schedule=beta)
                 .then(TrainOneStep(workers, lambda p, b: dqn_loss(p, b, dqn), grad_clip=dqn.grad_clip, seed=dqn.seed))
                 .then(UpdatePriorities(buffer))
                 .then(UpdateTargetNetwork(workers, dqn.target_network_update_freq, dqn.tau)))

    train = Concurrently({"ppo": ppo_train, "store": dqn_store, "dqn": dqn_train}, output=["ppo", "dqn"],
                         round_robin_weights={"ppo": 1, "store": joined, "dqn": joined * replays})
    train = (train.then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
             .then(UpdateWeights(workers)).then(LatestStats()))
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration,
                min_env_steps=ppo.train_batch_size, name="PPO+DQN")


build_plan.config_class = PPODQNConfig
