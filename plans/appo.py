"""APPO (asynchronous PPO, as in RLlib): workers sample without waiting for the learner; a
learner thread, fed through a bounded queue, corrects for the policy lag with V-trace
(Espeholt et al. 2018) and optimizes a clipped surrogate against a target network that is
updated every `target_update_freq` trained steps. Weights go out without blocking sampling.
Each result reports the policy lag of the batch it trained (`mean_policy_lag`, `max_policy_lag`:
weight versions between the learner and the policy that sampled each row; PolicyLag).
Multi-agent, each policy to train has its own target network, V-trace runs over each agent's
trajectories in its policy's rows, and the lag is also reported per policy
(policy/<name>/mean_policy_lag, ...).

mu is the behaviour policy (the worker's, `action_logp`), pi_target the target network and
pi the policy being trained. V-trace runs with pi_target as its target policy, so the
off-policy correction for mu -> pi_target is inside its advantages, once:
    rho_t = min(rho_bar, pi_target / mu)
    A_t   = rho_t (r_t + gamma v_{t+1} - V(s_t)),                    v_t = V-trace target
    r_t   = pi / pi_target
    L_pg  = -E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]
    L_vf  = 1/2 E[(V(s_t) - v_t)^2]
    L     = L_pg + c_vf L_vf - c_ent H[pi]
This is the loss of RLlib's APPO (`rllib/algorithms/appo/torch/appo_torch_learner.py`, Ray
2.10 and later; the same in `appo_torch_policy.py` of Ray 1.x-2.x), the clipped-target
surrogate of IMPACT (Luo et al. 2020). RLlib writes the ratio as clip(mu / pi_target, 0, 2)
* pi / mu, which is r_t except where mu > 2 pi_target; here it is r_t throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowrl.config import CommonConfig, ConfigError
from flowrl.device import batch_to_device
from flowrl.operators import (ConcatBatches, Concurrently, Dequeue, Enqueue, Gather, LearnerQueue,
                              LearningRateSchedule, ParallelRollouts, StandardMetricsReporting, TrainOneStep,
                              UpdateTargetNetwork, UpdateWeights, trained_rows, trajectory_ends)
from flowrl.multi_agent_batch import MultiAgentBatch
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
    network (pi_target: its outputs and, for Gaussian actions, its own log_std) and the
    current value function. Multi-agent: to each policy to train's rows, from that policy's
    networks; trajectory_ends cuts them where the agent changes, so V-trace never runs from one
    agent's steps into another's."""

    def __init__(self, workers: WorkerSet, config: APPOConfig):
        self.workers, self.config = workers, config

    def __call__(self, batch: SampleBatch | MultiAgentBatch) -> SampleBatch | MultiAgentBatch:
        if not isinstance(batch, MultiAgentBatch):
            return self._targets(self.workers.policy, batch)
        rows = trained_rows(self.workers, batch)
        targets = {pid: self._targets(self.workers.policies[pid], b) for pid, b in rows.items()}
        return batch.with_policy_batches({**batch.policy_batches, **targets})

    def _targets(self, policy, batch: SampleBatch) -> SampleBatch:
        with torch.no_grad():
            columns = batch.to_torch()
            tensors = batch_to_device({k: columns[k] for k in ("obs", "new_obs", "actions")}, policy.device)
            target_inputs, _ = policy.target_model(tensors["obs"])
            target_dist = policy.dist(target_inputs, model=policy.target_model)
            target_logp = target_dist.log_prob(tensors["actions"]).cpu().numpy()
            values = policy.model(tensors["obs"])[1].cpu().numpy()
            next_values = policy.model(tensors["new_obs"])[1].cpu().numpy()
        vs, pg_advantages = vtrace(batch["action_logp"], target_logp, batch["rewards"], values, next_values,
                                   batch["terminateds"], trajectory_ends(batch), self.config.gamma,
                                   self.config.vtrace_clip_rho, self.config.vtrace_clip_c)
        return batch.with_columns(target_logp=target_logp.astype(np.float32), vs=vs, pg_advantages=pg_advantages)


class PolicyLag(Map):
    """Measures how far behind the learner the policy that sampled each row of a batch was: the
    learner's weights_version when the batch is trained minus the row's `weights_version` (0:
    sampled with the very weights being trained). Passes its batch on; `add_to_stats`, put after
    the training step, adds `mean_policy_lag` and `max_policy_lag` of that batch to the learner's
    statistics, so a result reports the lag of the batch whose training it reports. Multi-agent:
    each row against its own policy's weights_version, over the rows of the policies to train,
    and per policy as policy/<name>/mean_policy_lag and policy/<name>/max_policy_lag.

    >>> workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    >>> workers.policy.weights_version = 5
    >>> lag = PolicyLag(workers)
    >>> _ = lag(SampleBatch({"weights_version": np.array([5, 3, 4, 1])}))
    >>> lag.add_to_stats({"total_loss": 0.5})
    {'total_loss': 0.5, 'mean_policy_lag': 1.75, 'max_policy_lag': 4}
    """

    def __init__(self, workers: WorkerSet):
        self.workers = workers
        self.last: dict[str, float] = {}

    def __call__(self, batch: SampleBatch | MultiAgentBatch) -> SampleBatch | MultiAgentBatch:
        policies = self.workers.policies
        lags = {pid: policies[pid].weights_version - rows["weights_version"]
                for pid, rows in trained_rows(self.workers, batch).items()}
        self.last = _lag_stats(np.concatenate(list(lags.values())) if lags else np.zeros(0, np.int64))
        if isinstance(batch, MultiAgentBatch):
            for pid, lag in lags.items():
                self.last.update({f"policy/{pid}/{k}": v for k, v in _lag_stats(lag).items()})
        return batch

    def add_to_stats(self, stats: dict) -> dict:
        # The learner's operators run one batch at a time, in order: `last` is this batch's.
        return {**stats, **self.last}


def _lag_stats(lag: np.ndarray) -> dict[str, float | int]:
    return {"mean_policy_lag": float(lag.mean()) if len(lag) else 0.0, "max_policy_lag": int(lag.max(initial=0))}


def appo_loss(policy, batch, config: APPOConfig):
    dist_inputs, values = policy.model(batch["obs"])
    dist = policy.dist(dist_inputs)
    logp = dist.log_prob(batch["actions"])
    ratio = (logp - batch["target_logp"]).exp()      # pi / pi_target; mu is already in the advantages
    advantages = batch["pg_advantages"]
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - config.clip_param, 1 + config.clip_param) * advantages)
    policy_loss = -surrogate.mean()
    vf_loss = 0.5 * ((values - batch["vs"]) ** 2).mean()
    entropy = dist.entropy().mean()
    total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy
    clip_fraction = ((ratio - 1).abs() > config.clip_param).float().mean()
    return total_loss, {"total_loss": total_loss, "policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": entropy,
                        "clip_fraction": clip_fraction}


def build_appo_plan(workers: WorkerSet, config: APPOConfig) -> Plan:
    def loss(policy, batch):
        return appo_loss(policy, batch, config)

    learner_queue = LearnerQueue(config.learner_queue_size)
    lag = PolicyLag(workers)
    sample = (ParallelRollouts(workers, Gather.ASYNC, max_in_flight=config.max_in_flight)
              .then(ConcatBatches(min_batch_size=config.train_batch_size))
              .then(Enqueue(learner_queue)))
    learn = (Dequeue(learner_queue)
             .then(UpdateTargetNetwork(workers, config.target_update_freq, policy_ids=workers.policies_to_train))
             .then(VTraceTargets(workers, config))
             .then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
             .then(lag)
             .then(TrainOneStep(workers, loss, config.num_sgd_iter, config.sgd_minibatch_size, config.grad_clip,
                                seed=config.seed))
             .map(lag.add_to_stats, name="PolicyLag.add_to_stats")
             .then(UpdateWeights(workers, wait=False))
             .through_thread(maxsize=1, name="learner"))
    train = Concurrently({"sample": sample, "train": learn}, output="train", order=Order.AS_READY)
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration, name="APPO")
