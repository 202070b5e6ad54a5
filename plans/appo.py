"""APPO (asynchronous PPO, as in RLlib): workers sample without waiting for the learner; a
learner thread, fed through a bounded queue, corrects for the policy lag with V-trace
(Espeholt et al. 2018) and optimizes a clipped surrogate against a target network that is
updated every `target_update_freq` trained steps. Weights go out without blocking sampling.

With rho_t = pi_target / mu (clipped at 2) and r_t = pi / pi_target:
    L_pg = -E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) rho_t],  A_t = V-trace advantage
    L_vf = 1/2 E[(V(s_t) - v_t)^2],                                   v_t = V-trace target
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowrl.config import CommonConfig, ConfigError
from flowrl.operators import (ConcatBatches, Concurrently, Dequeue, Enqueue, Gather, LearnerQueue, ParallelRollouts,
                              StandardMetricsReporting, TrainOneStep, UpdateTargetNetwork, UpdateWeights,
                              trajectory_ends)
from flowrl.plan import Plan
from flowrl.returns import vtrace
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Map, Order


@dataclass
class APPOConfig(CommonConfig):
    num_workers: int = 2
    num_envs_per_worker: int = 8
    rollout_fragment_length: int = 32
    train_batch_size: int = 512
    sgd_minibatch_size: int = 128
    num_sgd_iter: int = 4
    lr: float = 1e-3
    clip_param: float = 0.2
    vtrace_clip_rho: float = 1.0
    vtrace_clip_c: float = 1.0
    vf_loss_coeff: float = 0.5
    entropy_coeff: float = 0.0
    target_update_freq: int = 2048   # trained env steps between target network updates
    learner_queue_size: int = 4
    max_in_flight: int = 2           # sample() calls outstanding per worker

    def validate(self) -> None:
        super().validate()
        if self.num_workers < 1:
            raise ConfigError("num_workers", "APPO samples asynchronously and needs num_workers >= 1")
        for key in ("train_batch_size", "sgd_minibatch_size", "num_sgd_iter", "target_update_freq",
                    "learner_queue_size", "max_in_flight"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.clip_param <= 0:
            raise ConfigError("clip_param", f"must be > 0, got {self.clip_param}")


class VTraceTargets(Map):
    """Adds `target_logp`, `vs` and `pg_advantages` to a batch in time order, from the target
    network (pi_target) and the current value function."""

    def __init__(self, workers: WorkerSet, config: APPOConfig):
        self.workers, self.config = workers, config

    def __call__(self, batch: SampleBatch) -> SampleBatch:
        policy = self.workers.policy
        with torch.no_grad():
            tensors = batch.to_torch()
            target_inputs, _ = policy.target_model(tensors["obs"])
            target_logp = policy.dist(target_inputs).log_prob(tensors["actions"]).numpy()
            values = policy.model(tensors["obs"])[1].numpy()
            next_values = policy.model(tensors["new_obs"])[1].numpy()
        vs, pg_advantages = vtrace(batch["action_logp"], target_logp, batch["rewards"], values, next_values,
                                   batch["terminateds"], trajectory_ends(batch), self.config.gamma,
                                   self.config.vtrace_clip_rho, self.config.vtrace_clip_c)
        return batch.with_columns(target_logp=target_logp.astype(np.float32), vs=vs, pg_advantages=pg_advantages)


def appo_loss(policy, batch, config: APPOConfig):
    dist_inputs, values = policy.model(batch["obs"])
    dist = policy.dist(dist_inputs)
    logp = dist.log_prob(batch["actions"])
    is_ratio = (batch["target_logp"] - batch["action_logp"]).exp().clamp(0.0, 2.0)
    ratio = (logp - batch["target_logp"]).exp()
    advantages = batch["pg_advantages"]
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - config.clip_param, 1 + config.clip_param) * advantages)
    policy_loss = -(surrogate * is_ratio).mean()
    vf_loss = 0.5 * ((values - batch["vs"]) ** 2).mean()
    entropy = dist.entropy().mean()
    total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy
    return total_loss, {"total_loss": total_loss, "policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": entropy,
                        "mean_is_ratio": is_ratio.mean()}


def build_appo_plan(workers: WorkerSet, config: APPOConfig) -> Plan:
    def loss(policy, batch):
        return appo_loss(policy, batch, config)

    learner_queue = LearnerQueue(config.learner_queue_size)
    sample = (ParallelRollouts(workers, Gather.ASYNC, max_in_flight=config.max_in_flight)
              .then(ConcatBatches(min_batch_size=config.train_batch_size))
              .then(Enqueue(learner_queue)))
    learn = (Dequeue(learner_queue)
             .then(UpdateTargetNetwork(workers, config.target_update_freq))
             .then(VTraceTargets(workers, config))
             .then(TrainOneStep(workers, loss, config.num_sgd_iter, config.sgd_minibatch_size, config.grad_clip,
                                seed=config.seed))
             .then(UpdateWeights(workers, wait=False))
             .through_thread(maxsize=1, name="learner"))
    train = Concurrently({"sample": sample, "train": learn}, output="train", order=Order.AS_READY)
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration, name="APPO")
