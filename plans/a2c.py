"""A2C (Mnih et al. 2016, synchronous variant): one gradient step per sampled batch.

    L = -E[log pi(a_t|s_t) A_t] + c_vf 1/2 E[(V(s_t) - V_target_t)^2] - c_ent H[pi]

A_t from GAE(lambda) (lambda = 1: discounted returns) or n-step returns. With
`microbatch_size`, gradients are computed per microbatch and averaged before the step
(multi-agent: each policy's over its own rows, stepped by its own optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from flowrl.config import CommonConfig, ConfigError
from flowrl.operators import (ApplyGradients, ComputeAdvantages, ComputeGradients, Gather, LearningRateSchedule,
                              ParallelRollouts, StandardizeFields, StandardMetricsReporting, TrainOneStep,
                              UpdateWeights)
from flowrl.plan import Plan
from flowrl.rollout import WorkerSet


@dataclass
class A2CConfig(CommonConfig):
    rollout_fragment_length: int = 8
    lr: float = 7e-4
    lambda_: float = 1.0
    n_step: int | None = None          # n-step returns instead of GAE
    vf_loss_coeff: float = 0.5
    entropy_coeff: float = 0.0
    normalize_advantages: bool = False
    microbatch_size: int | None = None  # accumulate gradients over microbatches of this many rows

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.lambda_ <= 1:
            raise ConfigError("lambda_", f"must be in [0, 1], got {self.lambda_}")
        if self.n_step is not None and self.n_step < 1:
            raise ConfigError("n_step", f"must be >= 1, got {self.n_step}")
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ConfigError("microbatch_size", f"must be >= 1, got {self.microbatch_size}")


def a2c_loss(policy, batch, config: A2CConfig):
    dist_inputs, values = policy.model(batch["obs"])
    dist = policy.dist(dist_inputs)
    policy_loss = -(dist.log_prob(batch["actions"]) * batch["advantages"]).mean()
    vf_loss = 0.5 * ((values - batch["value_targets"]) ** 2).mean()
    entropy = dist.entropy().mean()
    total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy
    return total_loss, {"total_loss": total_loss, "policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": entropy}


def build_a2c_plan(workers: WorkerSet, config: A2CConfig) -> Plan:
    def loss(policy, batch):
        return a2c_loss(policy, batch, config)

    train = ParallelRollouts(workers, Gather.SYNC).then(ComputeAdvantages(config.gamma, config.lambda_, config.n_step))
    if config.normalize_advantages:
        train = train.then(StandardizeFields(["advantages"]))
    train = train.then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
    if config.microbatch_size is None:
        train = train.then(TrainOneStep(workers, loss, grad_clip=config.grad_clip))
    else:
        train = (train.then(ComputeGradients(workers, loss, config.microbatch_size))
                 .then(ApplyGradients(workers, config.grad_clip)))
    train = train.then(UpdateWeights(workers))
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration, name="A2C")
