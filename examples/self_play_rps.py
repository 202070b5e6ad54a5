"""Self-play on rock-paper-scissors: PPO's plan plus one operator that, every few training steps,
freezes a snapshot of the learning policy and maps the opponent to one of the snapshots.

    flowrl.build("examples.self_play_rps:build_self_play_plan", env="pettingzoo.classic.rps_v2:parallel_env",
                 config={"multiagent": {"policies": ["main"], "policy_mapping": {"player_*": "main"}}})

player_0 is always "main" (the policy that learns); player_1 plays "main" itself until the first
snapshot, then main_v1, main_v2, ... (episode by episode, any snapshot so far).
"""

from __future__ import annotations

import functools

from flowrl.operators import (ComputeAdvantages, ConcatBatches, Gather, LearningRateSchedule, ParallelRollouts,
                              StandardizeFields, StandardMetricsReporting, TrainOneStep, UpdateWeights)
from flowrl.plan import Plan, PlanContext
from flowrl.plans.ppo import PPOConfig, ppo_loss
from flowrl.rollout import WorkerSet
from flowrl.stream import Map


def against_snapshots(num_snapshots: int, agent_id: str, episode_id: int) -> str:
    """player_0: the learner; player_1: one of the snapshots, by episode."""
    return "main" if agent_id == "player_0" else f"main_v{1 + episode_id % num_snapshots}"


class SnapshotOpponent(Map):
    """Every `every` training steps: a frozen copy of "main" joins the policies, and the
    opponent is drawn from the copies. Reports `num_snapshots`. Its count is a plan counter, so
    a resumed run (whose checkpoint makes the snapshots again) maps the opponent as before."""

    def __init__(self, workers: WorkerSet, every: int):
        self.workers, self.every = workers, every
        self.mapped = 0  # snapshots the mapping draws from

    def setup(self, ctx: PlanContext) -> None:
        self.counters = ctx.counters

    def __call__(self, stats: dict) -> dict:
        counters = self.counters
        counters["self_play_steps"] += 1
        if counters["self_play_steps"] % self.every == 0:
            counters["num_snapshots"] += 1
            self.workers.add_policy(f"main_v{counters['num_snapshots']}", like="main")
        if self.mapped != counters["num_snapshots"]:
            self.mapped = counters["num_snapshots"]
            self.workers.set_policy_mapping(functools.partial(against_snapshots, self.mapped))
        return stats


def build_self_play_plan(workers: WorkerSet, config: PPOConfig, snapshot_every: int = 5) -> Plan:
    train = (ParallelRollouts(workers, Gather.SYNC)
             .then(ConcatBatches(min_batch_size=config.train_batch_size))
             .then(ComputeAdvantages(config.gamma, config.lambda_))
             .then(StandardizeFields(["advantages"]))
             .then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
             .then(TrainOneStep(workers, lambda p, b: ppo_loss(p, b, config, config.clip_param, config.kl_coeff),
                                config.num_sgd_iter, config.sgd_minibatch_size, config.grad_clip, seed=config.seed))
             .then(SnapshotOpponent(workers, snapshot_every))
             .then(UpdateWeights(workers)))
    return Plan(train, report=StandardMetricsReporting(), name="SelfPlayPPO")


build_self_play_plan.config_class = PPOConfig
