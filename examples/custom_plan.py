"""A custom plan in a few lines: REINFORCE with a learned baseline, built from flowrl's operators.

Run it with `flowrl run examples/custom_plan.yaml` (the YAML names this function as
`plan: examples.custom_plan:reinforce_plan`; run from the repository root).
"""

from dataclasses import dataclass

from flowrl import Plan
from flowrl.config import CommonConfig
from flowrl.operators import (ComputeAdvantages, LearningRateSchedule, ParallelRollouts, StandardizeFields,
                              StandardMetricsReporting, TrainOneStep, UpdateWeights)


@dataclass
class ReinforceConfig(CommonConfig):
    vf_loss_coeff: float = 0.5


def reinforce_loss(policy, batch, config):
    dist_inputs, values = policy.model(batch["obs"])
    logp = policy.dist(dist_inputs).log_prob(batch["actions"])
    policy_loss = -(logp * batch["advantages"]).mean()
    vf_loss = 0.5 * ((values - batch["value_targets"]) ** 2).mean()
    return policy_loss + config.vf_loss_coeff * vf_loss, {"policy_loss": policy_loss, "vf_loss": vf_loss}


def reinforce_plan(workers, config: ReinforceConfig) -> Plan:
    train = (ParallelRollouts(workers)
             .then(ComputeAdvantages(config.gamma, lam=1.0))      # discounted returns - V(s)
             .then(StandardizeFields(["advantages"]))
             .then(LearningRateSchedule(workers, config.lr, config.lr_schedule))   # config.lr_schedule, if given
             .then(TrainOneStep(workers, lambda policy, batch: reinforce_loss(policy, batch, config)))
             .then(UpdateWeights(workers)))
    return Plan(train, report=StandardMetricsReporting(), name="REINFORCE")


reinforce_plan.config_class = ReinforceConfig
