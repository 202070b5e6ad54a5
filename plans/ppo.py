"""PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms").

Loss per minibatch, with r_t = pi(a_t|s_t) / pi_old(a_t|s_t) and advantages A_t from GAE:
    L_clip = -E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]
    L_vf   = 1/2 E[(V(s_t) - V_target_t)^2]        (optionally clipped around the old values)
    L      = L_clip + c_vf L_vf - c_ent H[pi] + beta KL

With `kl_target`, beta adapts after each training step as RLlib does (x1.5 when the KL is
above twice the target, x0.5 below half of it), starting from `kl_coeff`, or from 0.2
(RLlib's default) when `kl_coeff` is 0: a multiplicative update never leaves 0. Multi-agent,
each policy to train has its own beta, adapted from its own KL and reported as
policy/<name>/kl_coeff; plan state keeps it as kl_coeff/<name> (`kl_state_key`), so a
checkpoint restores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowrl.config import CommonConfig, ConfigError, check_schedule, schedule_value
from flowrl.operators import (ComputeAdvantages, ConcatBatches, Gather, LearningRateSchedule, ParallelRollouts,
                              StandardizeFields, StandardMetricsReporting, TrainOneStep, UpdateWeights)
from flowrl.plan import Plan, PlanContext
from flowrl.rollout import WorkerSet
from flowrl.stream import Map


@dataclass
class PPOConfig(CommonConfig):
    train_batch_size: int = 2048
    sgd_minibatch_size: int = 256
    num_sgd_iter: int = 10
    lr: float = 3e-4
    lambda_: float = 0.95
    clip_param: float = 0.2
    clip_param_schedule: list | None = None   # [[timestep, clip], ...]
    vf_clip_param: float | None = None        # clip value updates around the old values
    vf_loss_coeff: float = 0.5
    entropy_coeff: float = 0.0
    kl_coeff: float = 0.0                     # > 0 adds beta * KL to the loss
    kl_target: float | None = None            # adapt kl_coeff towards this KL (x1.5 / x0.5), from 0.2 when
                                              # kl_coeff is 0 (RLlib's default; x1.5 would keep 0 at 0)
    normalize_advantages: bool = True

    def validate(self) -> None:
        super().validate()
        for key in ("train_batch_size", "sgd_minibatch_size", "num_sgd_iter"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.sgd_minibatch_size > self.train_batch_size:
            raise ConfigError("sgd_minibatch_size", f"{self.sgd_minibatch_size} exceeds train_batch_size "
                                                    f"{self.train_batch_size}")
        if not 0 <= self.lambda_ <= 1:
            raise ConfigError("lambda_", f"must be in [0, 1], got {self.lambda_}")
        if self.clip_param <= 0:
            raise ConfigError("clip_param", f"must be > 0, got {self.clip_param}")
        if self.kl_coeff < 0:
            raise ConfigError("kl_coeff", f"must be >= 0, got {self.kl_coeff}")
        check_schedule("clip_param_schedule", self.clip_param_schedule)


def ppo_loss(policy, batch: dict[str, torch.Tensor], config: PPOConfig, clip_param: float, kl_coeff: float):
    dist_inputs, values = policy.model(batch["obs"])
    dist = policy.dist(dist_inputs)
    logp = dist.log_prob(batch["actions"])
    log_ratio = logp - batch["action_logp"]
    ratio = log_ratio.exp()
    advantages = batch["advantages"]

    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_param, 1 + clip_param) * advantages)
    policy_loss = -surrogate.mean()

    value_error = (values - batch["value_targets"]) ** 2
    if config.vf_clip_param is not None:
        old_values = batch["vf_preds"]
        clipped = old_values + (values - old_values).clamp(-config.vf_clip_param, config.vf_clip_param)
        value_error = torch.max(value_error, (clipped - batch["value_targets"]) ** 2)
    vf_loss = 0.5 * value_error.mean()

    entropy = dist.entropy().mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator of KL(pi_old || pi), >= 0

    total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy + kl_coeff * approx_kl
    clip_fraction = ((ratio - 1).abs() > clip_param).float().mean()
    return total_loss, {"total_loss": total_loss, "policy_loss": policy_loss, "vf_loss": vf_loss,
                        "entropy": entropy, "kl": approx_kl, "clip_fraction": clip_fraction}


def kl_state_key(policy_id: str | None) -> str:
    """Where plan state keeps a KL coefficient: kl_coeff single-agent (policy_id None),
    kl_coeff/<policy id> multi-agent."""
    return "kl_coeff" if policy_id is None else f"kl_coeff/{policy_id}"


def _stat_key(policy_id: str | None, name: str) -> str:
    """A statistic's name in results: as is single-agent, policy/<id>/<name> multi-agent."""
    return name if policy_id is None else f"policy/{policy_id}/{name}"


class ClipSchedule(Map):
    """Sets this iteration's clip range from the env steps sampled so far; reports it with the
    KL coefficients in use (`policy_ids`: the policies that have one; [None]: single-agent)."""

    def __init__(self, config: PPOConfig, state: dict, policy_ids: Sequence[str | None]):
        self.config, self.state, self.policy_ids = config, state, policy_ids

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, batch):
        steps = self.ctx.counters["num_env_steps_sampled"]
        self.state["clip_param"] = schedule_value(self.config.clip_param_schedule, steps, self.config.clip_param)
        self.ctx.info["clip_param"] = self.state["clip_param"]
        for pid in self.policy_ids:
            self.ctx.info[_stat_key(pid, "kl_coeff")] = self.state[kl_state_key(pid)]
        return batch


class AdaptKL(Map):
    """Moves each KL coefficient towards kl_target after each training step (as in the PPO
    paper), by its own policy's `kl` statistic; a policy not trained in this step (no rows)
    keeps its coefficient. `policy_ids`: as ClipSchedule's."""

    def __init__(self, config: PPOConfig, state: dict, policy_ids: Sequence[str | None] = (None,)):
        self.config, self.state, self.policy_ids = config, state, policy_ids

    def __call__(self, stats: dict) -> dict:
        for pid in self.policy_ids:
            # Single-agent the loss must report `kl`; a policy with no rows in this step has none.
            kl, key = (stats["kl"] if pid is None else stats.get(_stat_key(pid, "kl"))), kl_state_key(pid)
            if kl is None:
                continue
            if kl > 2.0 * self.config.kl_target:
                self.state[key] *= 1.5
            elif kl < 0.5 * self.config.kl_target:
                self.state[key] *= 0.5
        return stats


INITIAL_ADAPTIVE_KL_COEFF = 0.2  # RLlib's default kl_coeff


def build_ppo_plan(workers: WorkerSet, config: PPOConfig) -> Plan:
    kl_coeff = config.kl_coeff
    if config.kl_target is not None and kl_coeff == 0:
        kl_coeff = INITIAL_ADAPTIVE_KL_COEFF
    policy_ids = list(workers.policies_to_train) if workers.is_multi_agent else [None]
    state = {kl_state_key(pid): kl_coeff for pid in policy_ids}
    state["clip_param"] = config.clip_param

    def loss(policy, batch):
        pid = next(name for name, p in workers.policies.items() if p is policy) if workers.is_multi_agent else None
        return ppo_loss(policy, batch, config, state["clip_param"], state[kl_state_key(pid)])

    train = (ParallelRollouts(workers, Gather.SYNC)
             .then(ConcatBatches(min_batch_size=config.train_batch_size))
             .then(ComputeAdvantages(config.gamma, config.lambda_)))
    if config.normalize_advantages:
        train = train.then(StandardizeFields(["advantages"]))
    train = (train.then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
             .then(ClipSchedule(config, state, policy_ids))
             .then(TrainOneStep(workers, loss, config.num_sgd_iter, config.sgd_minibatch_size, config.grad_clip,
                                seed=config.seed)))
    if config.kl_target is not None:
        train = train.then(AdaptKL(config, state, policy_ids))
    train = train.then(UpdateWeights(workers))
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration,
                name="PPO", state=state)
