"""MARWIL (Wang et al. 2018, "Exponentially Weighted Imitation Learning for Batched Historical
Data") and BC, its beta = 0 case, trained from an offline dataset.

Per minibatch, with R_t the discounted return-to-go in the recorded episode (bootstrapped
from V(s_T) of the learner's current value function where the dataset holds the episode
without its termination: truncated, or cut where the recording stops; as RLlib does):
    A_t    = R_t - V(s_t)
    c^2   <- c^2 + rate (mean(A_t^2) - c^2)            (running scale of the advantages)
    w_t    = exp(beta A_t / c)                          (capped at 20; 1 when beta = 0)
    L_pi   = -E[w_t log pi(a_t|s_t)]
    L_vf   = 1/2 E[A_t^2]                               (not trained when beta = 0)
    L      = L_pi + c_vf L_vf

`input` names the dataset (for a multi-agent recording, `input_policy_id` the policy whose rows
train this single-agent policy, with that policy's spaces); `input_fraction` < 1 fills the rest of each batch with fresh
experience sampled by the workers (its R_t bootstrapped from V at fragment ends).

Run with `multiagent` (and the env, whose agents and spaces the policies come from), `input` is a
multi-agent recording and each policy to train learns from its own rows: the input yields
MultiAgentBatches of `train_batch_size` rows per policy, TrainOneStep trains each policy with its
own optimizer, c^2 is kept per policy, and R_t runs along each agent's trajectory (eps_id,
agent_id). `input_fraction` < 1 and the IS/WIS estimates are single-agent only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl.config import CommonConfig, ConfigError
from flowrl.connectors import Dataset, open_policy
from flowrl.connectors.multi_agent import MultiAgentDatasetInput, open_policies
from flowrl.connectors.reader import (DatasetInput, EpisodeReturns, check_episode_ids, complete_episodes,
                                     spaces_for)
from flowrl.multi_agent import parse_multiagent
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.operators import (ComputeAdvantages, ConcatBatches, LearningRateSchedule, ParallelRollouts,
                              StandardMetricsReporting, TrainOneStep, UpdateWeights)
from flowrl.operators.evaluation import EvaluatePolicy, OffPolicyEstimates
from flowrl.plan import Plan
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Map, zip_streams

MAX_WEIGHT = 20.0


@dataclass
class MARWILConfig(CommonConfig):
    input: str | list | None = None          # dataset: path, directory, glob, URI (s3://...), list, or minari:ID
    input_policy_id: str | None = None       # a multi-agent recording: the policy whose rows train this one
    input_fraction: float = 1.0              # share of each batch read from input; the rest sampled live
    input_num_epochs: int | None = None      # passes over the dataset; null repeats until a stop condition
    shuffle_buffer_size: int = 50_000        # rows
    beta: float = 1.0                        # 0 is behaviour cloning
    vf_coeff: float = 1.0
    moving_average_sqd_adv_norm_start: float = 100.0
    moving_average_sqd_adv_norm_update_rate: float = 0.01
    train_batch_size: int = 2048
    sgd_minibatch_size: int | None = None    # null: the whole batch in one step
    num_sgd_iter: int = 1
    lr: float = 1e-3
    grad_clip: float | None = None
    evaluation_interval: int = 10            # iterations between greedy evaluations in `env`; 0: none
    evaluation_num_episodes: int = 10
    off_policy_estimation_episodes: int = 100  # recorded episodes for IS/WIS estimates; 0: none
    off_policy_estimation_interval: int = 10

    reads_datasets = True

    def check_input(self) -> None:  # `input` is a dataset here (checked below), not a policy server
        if self.external:
            raise ConfigError("external", "offline plans read a dataset (input); they serve no clients")

    def validate(self) -> None:
        super().validate()
        if self.input is None:
            raise ConfigError("input", "missing: the dataset to train from (a path, glob, URI, list, or minari:ID)")
        if not 0 < self.input_fraction <= 1:
            raise ConfigError("input_fraction", f"must be in (0, 1], got {self.input_fraction}")
        if self.beta < 0:
            raise ConfigError("beta", f"must be >= 0, got {self.beta}")
        for key in ("train_batch_size", "shuffle_buffer_size", "num_sgd_iter", "evaluation_num_episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("evaluation_interval", "off_policy_estimation_episodes", "off_policy_estimation_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.input_num_epochs is not None and self.input_num_epochs < 1:
            raise ConfigError("input_num_epochs", f"must be >= 1 or null, got {self.input_num_epochs}")
        if self.sgd_minibatch_size is not None and not 1 <= self.sgd_minibatch_size <= self.train_batch_size:
            raise ConfigError("sgd_minibatch_size", f"must be in [1, train_batch_size], got {self.sgd_minibatch_size}")
        if self.multiagent is not None:
            if self.input_policy_id is not None:
                raise ConfigError("input_policy_id", "with multiagent each policy to train reads its own rows of the "
                                                     "dataset; leave input_policy_id out")
            if self.input_fraction < 1:
                raise ConfigError("input_fraction", "must be 1 with multiagent (mixing in live sampling is "
                                                    "single-agent only)")

    def input_columns(self) -> list[str]:
        """The dataset columns training batches are read with."""
        return ["obs", "actions"] + (["eps_id", "t"] if self.beta > 0 else [])

    def returns_columns(self) -> list[str]:
        """The columns returns-to-go are worked out from, once, before training (new_obs:
        where an episode needs V(s_T) to bootstrap)."""
        return ["eps_id", "t", "rewards", "terminateds"] if self.beta > 0 else []


@dataclass
class BCConfig(MARWILConfig):
    beta: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.beta != 0:
            raise ConfigError("beta", "BC is MARWIL with beta = 0; use the MARWIL plan for beta > 0")


def marwil_loss(policy, batch: dict[str, torch.Tensor], config: MARWILConfig, state: dict,
                key: str = "sqd_adv_norm"):
    """MARWIL's loss (see the module docstring); c^2 is `state[key]`, updated in place."""
    dist_inputs, values = policy.model(batch["obs"])
    logp = policy.dist(dist_inputs).log_prob(batch["actions"])
    if config.beta == 0:
        policy_loss = -logp.mean()
        return policy_loss, {"total_loss": policy_loss, "policy_loss": policy_loss}

    advantages = batch["value_targets"] - values
    adv = advantages.detach()
    state[key] += config.moving_average_sqd_adv_norm_update_rate * (float((adv ** 2).mean()) - state[key])
    weights = torch.exp(config.beta * adv / (1e-8 + state[key] ** 0.5)).clamp(max=MAX_WEIGHT)
    policy_loss = -(weights * logp).mean()
    vf_loss = 0.5 * (advantages ** 2).mean()

    total_loss = policy_loss + config.vf_coeff * vf_loss
    return total_loss, {"total_loss": total_loss, "policy_loss": policy_loss, "vf_loss": vf_loss,
                        "mean_weight": weights.mean()}


class AddReturnsToGo(Map):
    """Adds `value_targets`: each row's discounted return-to-go in its recorded episode,
    bootstrapped with the learner's current V(s_T) where the episode did not terminate.
    `returns`: one dataset's EpisodeReturns, or a dict of them by policy id for a multi-agent
    recording, whose MultiAgentBatches' policies each look up their own, with their own V."""

    def __init__(self, returns: EpisodeReturns | dict[str, EpisodeReturns], workers: WorkerSet):
        self.returns = returns if isinstance(returns, dict) else {"default_policy": returns}
        self.workers = workers

    def __call__(self, batch: SampleBatch | MultiAgentBatch) -> SampleBatch | MultiAgentBatch:
        if isinstance(batch, MultiAgentBatch):
            return batch.with_policy_batches({pid: self._add(pid, b) for pid, b in batch.policy_batches.items()})
        return self._add("default_policy", batch)

    def _add(self, pid: str, batch: SampleBatch) -> SampleBatch:
        targets = self.returns[pid].lookup(batch["eps_id"], batch["t"], value=self.workers.policies[pid].value)
        return batch.with_columns(value_targets=targets)


def _mix(columns: list[str]):
    def mix(parts: dict[str, SampleBatch]) -> SampleBatch:
        return SampleBatch.concat([parts["input"].select(columns), parts["fresh"].select(columns)])
    return mix


def _estimates_off_policy(config: MARWILConfig, dataset: Dataset) -> bool:
    return bool(config.off_policy_estimation_episodes and config.off_policy_estimation_interval
                and "action_logp" in dataset.columns and config.multiagent is None)


def open_inputs(config: MARWILConfig, policies: list[str] | None = None, to_train: list[str] | None = None
                ) -> dict[str, Dataset]:
    """The dataset of each policy to train: {"default_policy": the dataset} single-agent;
    with multiagent, each policy to train's rows of the recording (`policies`: the run's,
    `to_train`: by default config.multiagent's policies_to_train, else all)."""
    if config.multiagent is None:
        return {"default_policy": open_policy(config.input, config.input_policy_id)}
    if to_train is None:
        to_train = parse_multiagent(config.multiagent).policies_to_train or policies
    return open_policies(config.input, policies, to_train)


def check_input(config: MARWILConfig, env_spaces: dict | None) -> dict:
    """Opens the dataset and checks its columns and shapes before anything runs (DatasetError
    naming the file and column); returns the spaces to train with (multi-agent: the env's
    spaces by policy id)."""
    if config.multiagent is not None and env_spaces is None:
        raise ConfigError("multiagent", "an offline plan takes its policies' agents and spaces from the env: "
                                        "name it (env: ...)")
    datasets = open_inputs(config, None if config.multiagent is None else list(env_spaces))
    for dataset in datasets.values():
        dataset.check(config.input_columns() + config.returns_columns())
        if config.beta > 0 or _estimates_off_policy(config, dataset):
            check_episode_ids(dataset)   # ids two episodes share, before a run directory exists
    if config.multiagent is not None:
        for pid, dataset in datasets.items():
            spaces_for(dataset, env_spaces[pid])
        return env_spaces
    if env_spaces is None and config.input_fraction < 1:
        raise ConfigError("input_fraction", "< 1 mixes in live sampling, which needs an env")
    if env_spaces is None and config.num_workers > 0:
        raise ConfigError("num_workers", "rollout workers need an env; without one, use num_workers: 0")
    return spaces_for(datasets["default_policy"], env_spaces)


def build_marwil_plan(workers: WorkerSet, config: MARWILConfig) -> Plan:
    datasets = open_inputs(config, list(workers.policies), workers.policies_to_train)
    start = config.moving_average_sqd_adv_norm_start
    input_rows = max(1, round(config.train_batch_size * config.input_fraction))
    reading = dict(columns=config.input_columns(), batch_size=input_rows, shuffle_buffer_size=config.shuffle_buffer_size,
                   seed=config.seed, num_epochs=config.input_num_epochs)
    if workers.is_multi_agent:
        data = MultiAgentDatasetInput(datasets, count_steps_by=config.count_steps_by, **reading)
    else:
        data = DatasetInput(datasets["default_policy"], **reading)
    keys = {pid: f"policy/{pid}/sqd_adv_norm" if workers.is_multi_agent else "sqd_adv_norm" for pid in datasets}
    state = {key: start for key in keys.values()}   # c^2, per policy
    dataset = next(iter(datasets.values()))
    train_columns = ["obs", "actions"]
    if config.beta > 0:
        returns = {pid: EpisodeReturns.from_dataset(d, config.gamma) for pid, d in datasets.items()}
        data = data.then(AddReturnsToGo(returns, workers))
        train_columns.append("value_targets")
    if input_rows < config.train_batch_size:
        fresh = (ParallelRollouts(workers)
                 .then(ConcatBatches(config.train_batch_size - input_rows))
                 .then(ComputeAdvantages(config.gamma, lam=1.0)))  # value_targets: bootstrapped returns
        data = zip_streams(input=data, fresh=fresh, name="MixInput").map(_mix(train_columns), name="MixInput.concat")

    policy_ids = {id(policy): pid for pid, policy in workers.policies.items()}

    def loss(policy, batch):
        return marwil_loss(policy, batch, config, state, keys[policy_ids[id(policy)]])

    train = (data.then(LearningRateSchedule(workers, config.lr, config.lr_schedule))
             .then(TrainOneStep(workers, loss, config.num_sgd_iter, config.sgd_minibatch_size, config.grad_clip,
                                seed=config.seed)))
    if workers.num_remote_workers:
        train = train.then(UpdateWeights(workers))
    env = workers.worker_kwargs.get("env")
    if env is not None and config.evaluation_interval:
        train = train.then(EvaluatePolicy(workers, env, workers.worker_kwargs.get("env_config"),
                                          config.evaluation_num_episodes, config.evaluation_interval))
    if _estimates_off_policy(config, dataset):
        episodes = complete_episodes(dataset, ["obs", "actions", "rewards", "action_logp"],
                                     config.off_policy_estimation_episodes)
        if len(episodes["eps_id"]):
            train = train.then(OffPolicyEstimates(workers, episodes, config.gamma,
                                                  config.off_policy_estimation_interval))
    return Plan(train, report=StandardMetricsReporting(), min_time_s=config.min_time_s_per_iteration,
                name="MARWIL" if config.beta > 0 else "BC", state=state)


build_marwil_plan.config_class = MARWILConfig


def build_bc_plan(workers: WorkerSet, config: BCConfig) -> Plan:
    return build_marwil_plan(workers, config)


build_bc_plan.config_class = BCConfig
