"""Operators that measure the learner policy without training it: greedy evaluation in a real
env (EvaluatePolicy) and off-policy estimates on recorded episodes (OffPolicyEstimates). Both
pass their input through and add their figures to the next result record."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flowrl.estimators import importance_sampling
from flowrl.plan import PlanContext
from flowrl.rollout import WorkerSet, evaluate_policy
from flowrl.stream import Map


class _Every(Map):
    """Runs `measure()` on the first item and then every `interval` items; its dict goes into
    the result record under `key`."""

    key = ""

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError("interval must be >= 1")
        self.interval = interval
        self.calls = 0

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, item: Any) -> Any:
        if self.calls % self.interval == 0:
            self.ctx.info[self.key] = self.measure()
        self.calls += 1
        return item

    def measure(self) -> dict[str, Any]:
        raise NotImplementedError


class EvaluatePolicy(_Every):
    """Every `interval` items, plays `episodes` greedy episodes of `env` with the learner's
    policy; the result record gets `evaluation/episode_return_mean` (and min, max). Multi-agent:
    the learner's policies act together; `evaluation/...` is then of the team return (the sum
    over agents) and policy/<name>/evaluation/episode_return_mean (min, max) of each policy's agents.

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(env="CartPole-v1", seed=0)
    >>> with Plan(Stream.from_iterable([{}]).then(EvaluatePolicy(workers, "CartPole-v1", episodes=2))) as plan:
    ...     result = plan.step()
    >>> sorted(result["evaluation"])
    ['episode_len_mean', 'episode_return_max', 'episode_return_mean', 'episode_return_min', 'episodes']
    """

    key = "evaluation"

    def __init__(self, workers: WorkerSet, env: str, env_config: dict | None = None, episodes: int = 10,
                 interval: int = 1, seed: int = 0):
        super().__init__(interval)
        self.workers, self.env, self.env_config = workers, env, env_config or {}
        self.episodes, self.seed = episodes, seed

    def measure(self) -> dict[str, Any]:
        if self.workers.is_multi_agent:
            return self._measure_policies()
        returns, lengths = evaluate_policy(self.workers.policy, self.env, self.env_config, self.episodes, self.seed,
                                           with_lengths=True, **self.workers.evaluation_env())
        return episode_summary(returns, lengths)

    def _measure_policies(self) -> dict[str, Any]:
        from flowrl.multi_agent_rollout import evaluate_multi_agent

        team, per_policy = evaluate_multi_agent(self.workers.policies, self.env, self.env_config,
                                                self.workers.worker_kwargs["multiagent"], self.episodes, self.seed)
        for pid, returns in per_policy.items():
            for key, value in episode_summary(returns).items() if returns else ():
                self.ctx.info[f"policy/{pid}/evaluation/{key}"] = value
        return episode_summary(team)


def episode_summary(returns: list[float], lengths: list[int] | None = None) -> dict[str, Any]:
    """What an evaluation reports of its episodes (their mean length when `lengths` are given).

    >>> s = episode_summary([10.0, 20.0], [10, 30])
    >>> s["episode_return_mean"], s["episode_return_min"], s["episode_return_max"], s["episode_len_mean"], s["episodes"]
    (15.0, 10.0, 20.0, 20.0, 2)
    """
    summary = {"episode_return_mean": float(np.mean(returns)), "episode_return_min": float(np.min(returns)),
               "episode_return_max": float(np.max(returns)), "episodes": len(returns)}
    if lengths is not None:
        summary["episode_len_mean"] = float(np.mean(lengths))
    return summary


class OffPolicyEstimates(_Every):
    """Every `interval` items, importance-sampling (IS) and weighted IS estimates of the learner
    policy's return on recorded whole episodes (columns obs, actions, rewards, action_logp,
    eps_id; rows grouped by episode, in time order); the result record gets
    `off_policy_estimation/is/v_target`, `.../wis/v_gain`, `.../v_behavior`, ...

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=1, rollout_fragment_length=50, seed=0)
    >>> b = workers.local_worker.sample()
    >>> ope = OffPolicyEstimates(workers, b.to_numpy(), gamma=0.99)
    >>> with Plan(Stream.from_iterable([{}]).then(ope)) as plan:
    ...     result = plan.step()
    >>> round(result["off_policy_estimation"]["is/v_gain"], 3)   # the policy that recorded them
    1.0
    """

    key = "off_policy_estimation"

    def __init__(self, workers: WorkerSet, episodes: dict[str, np.ndarray], gamma: float, interval: int = 1):
        super().__init__(interval)
        self.workers, self.episodes, self.gamma = workers, episodes, gamma

    def measure(self) -> dict[str, Any]:
        policy = self.workers.policy
        obs = policy.to_tensor(self.episodes["obs"])
        with torch.inference_mode():
            dist_inputs, _ = policy.model(obs)
            actions = torch.as_tensor(self.episodes["actions"], device=dist_inputs.device)
            target_logp = policy.dist(dist_inputs).log_prob(actions).cpu().numpy()
        return importance_sampling(target_logp, self.episodes["action_logp"], self.episodes["rewards"],
                                   self.episodes["eps_id"], self.gamma)
