"""PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms").

Loss per minibatch, with r_t = pi(a_t|s_t) / pi_old(a_t|s_t) and advantages A_t from GAE:
    L_clip = -E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]
    L_vf   = 1/2 E[(V(s_t) - V_target_t)^2]        (optionally clipped around the old values)
    L      = L_clip + c_vf L_vf - c_ent H[pi] + beta KL

With `kl_target`, beta adapts after each training step as RLlib does (x1.5 when the KL is
above twice the target, x0.5 below half of it), starting from `kl_coeff`, or from 0.2
(RLlib's default) when `kl_coeff` is 0: a multiplicative update never leaves 0.
"""

from __future__ import annotations

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


class ClipSchedule(Map):
    """Sets this iteration's clip range from the env steps sampled so far; reports it with the
    KL coefficient in use."""

    def __init__(self, config: PPOConfig, state: dict):
        self.config, self.state = config, state

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, batch):
        steps = self.ctx.counters["num_env_steps_sampled"]
        self.state["clip_param"] = schedule_value(self.config.clip_param_schedule, steps, self.config.clip_param)
        self.ctx.info.update(clip_param=self.state["clip_param"], kl_coeff=self.state["kl_coeff"])
        return batch


class AdaptKL(Map):
    """Moves kl_coeff towards kl_target after each training step (as in the PPO paper)."""

    def __init__(self, config: PPOConfig, state: dict):
        self.config, self.state = config, state

    def __call__(self, stats: dict) -> dict:
        if stats["kl"] > 2.0 * self.config.kl_target:
            self.state["kl_coeff"] *= 1.5
        elif stats["kl"] < 0.5 * self.config.kl_target:
            self.state["kl_coeff"] *= 0.5
        return stats


INITIAL_ADAPTIVE_KL_COEFF = 0.2  # RLlib's default kl_coeff


def build_ppo_plan(workers: WorkerSet, config: PPOConfig) -> Plan:
    kl_coeff = config.kl_coeff
    if config.kl_target is not None and kl_coeff == 0:
        kl_coeff = INITIAL_ADAPTIVE_KL_COEFF
    state = {"kl_coeff": kl_coeff, "clip_param": config.clip_param}

    def loss(policy, batch):
        return ppo_loss(policy, batch, config, state["clip_param"], state["kl_coeff"])

    train = (ParallelRollouts(workers, Gather.SYNC)
             .then(ConcatBatches(min_batch_size=config.train_batch_size))
             .then(ComputeAdvantages(config.gamma, config.lambda_)))
    if config.normalize_advantages:
        train = train.then(StandardizeFields(["advantages"]))
    train = (train.then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
             .then(ClipSchedule(config, state))
             .then(TrainOneStep(workers, loss, config.num_sgd_iter, config.sgd_minibatch_size, config.grad_clip,
                                seed=config.seed)))
    if config.kl_target is not None:
        train = train.then(AdaptKL(config, state))
    train = train.then(UpdateWeights(workers))
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration,
                name="PPO", state=state)
