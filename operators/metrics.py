"""StandardMetricsReporting: what every RL result record holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flowrl.plan import PlanContext


class StandardMetricsReporting:
    """A plan's `report`: episode statistics over the last `num_episodes` (at most 100) finished
    episodes, RLlib's aliases for the counters, and the learner's statistics (the item, when it
    is a Mapping). With several policies, `episode_return_mean` is the team's (the sum over
    agents) and `policy/<name>/episode_return_mean` that of the policy's agents. How often a result is made is the plan's to say (`Plan(min_time_s=...,
    min_env_steps=...)`).

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> report = StandardMetricsReporting()
    >>> with Plan(Stream.from_iterable([{"total_loss": 0.5}]), report=report) as plan:
    ...     plan.ctx.episodes.extend([(10.0, 10), (20.0, 20)])
    ...     result = plan.step()
    >>> result["episode_return_mean"], result["episode_len_mean"], result["total_loss"]
    (15.0, 15.0, 0.5)
    """

    name = "StandardMetricsReporting"

    def __init__(self, num_episodes: int = 100):
        if not 1 <= num_episodes <= 100:
            raise ValueError(f"num_episodes must be in [1, 100] (the episodes a plan keeps), got {num_episodes}")
        self.num_episodes = num_episodes

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, item: Any) -> dict[str, Any]:
        episodes = self.ctx.episodes
        if self.num_episodes < len(episodes):
            episodes = list(episodes)[-self.num_episodes:]
        returns = np.array([r for r, _ in episodes], dtype=np.float64)
        lengths = np.array([n for _, n in episodes], dtype=np.float64)
        counters = self.ctx.counters
        out: dict[str, Any] = {
            "episode_return_mean": float(returns.mean()) if len(returns) else None,
            "episode_return_min": float(returns.min()) if len(returns) else None,
            "episode_return_max": float(returns.max()) if len(returns) else None,
            "episode_len_mean": float(lengths.mean()) if len(lengths) else None,
            "timesteps_total": counters["num_env_steps_sampled"],
            "episodes_total": counters["num_episodes"],
        }
        for pid, policy_episodes in self.ctx.policy_episodes.items():  # multi-agent: each policy's agents
            policy_returns = [r for r, _ in list(policy_episodes)[-self.num_episodes:]]
            out[f"policy/{pid}/episode_return_mean"] = float(np.mean(policy_returns)) if policy_returns else None
        if isinstance(item, Mapping):
            out.update(item)
        return out
