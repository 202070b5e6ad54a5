"""MultiAgentBatch: one SampleBatch per policy, plus the env steps they cover.

Each policy's batch has a row per step of one of its agents (an `agent_id` column says whose),
trajectories agent by agent as the rollout worker laid them out. `env_steps` counts steps of
the envs, `agent_steps` the rows of all policies; `len()` is the one `count_steps_by` names, so
that batch-size operators (ConcatBatches) count what the config says. `episodes` are (team
return, length in env steps) of the episodes that finished, as SampleBatch.episodes;
`policy_episodes` the (return, length in agent steps) of their agents, by the agents' policy (a
policy may have finished episodes and no rows: its agents left before this batch began).

>>> import numpy as np
>>> a = SampleBatch({"rewards": np.ones(3, np.float32)})
>>> b = SampleBatch({"rewards": np.ones(2, np.float32)})
>>> batch = MultiAgentBatch({"red": a, "blue": b}, env_steps=3, episodes=[(5.0, 3)],
...                         policy_episodes={"red": [(3.0, 3)], "blue": [(2.0, 2)]})
>>> len(batch), batch.agent_steps, batch.policy_episodes["red"]
(3, 5, [(3.0, 3)])
>>> len(MultiAgentBatch.concat([batch, batch]))
6
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import wraps
from typing import Any

from flowrl.sample_batch import SampleBatch


class MultiAgentBatch:
    """Experience of several policies from the same env steps; see the module docstring."""

    __slots__ = ("policy_batches", "env_steps", "episodes", "policy_episodes", "count_steps_by", "env_faults")

    def __init__(self, policy_batches: dict[str, SampleBatch], env_steps: int,
                 episodes: Sequence[tuple[float, int]] | None = None, count_steps_by: str = "env_steps",
                 env_faults: int = 0, policy_episodes: dict[str, list[tuple[float, int]]] | None = None):
        if count_steps_by not in ("env_steps", "agent_steps"):
            raise ValueError(f"count_steps_by must be env_steps or agent_steps, got {count_steps_by!r}")
        self.policy_batches = dict(policy_batches)
        self.env_steps = int(env_steps)
        self.episodes = list(episodes or [])
        self.policy_episodes = {pid: list(e) for pid, e in (policy_episodes or {}).items()}
        self.count_steps_by = count_steps_by
        self.env_faults = env_faults

    @property
    def agent_steps(self) -> int:
        return sum(len(b) for b in self.policy_batches.values())

    def __len__(self) -> int:
        return self.env_steps if self.count_steps_by == "env_steps" else self.agent_steps

    def __getitem__(self, policy_id: str) -> SampleBatch:
        return self.policy_batches[policy_id]

    def __repr__(self) -> str:
        parts = ", ".join(f"{pid}: {len(b)}" for pid, b in self.policy_batches.items())
        return f"MultiAgentBatch(env_steps={self.env_steps}, {{{parts}}})"

    def with_policy_batches(self, policy_batches: dict[str, SampleBatch]) -> "MultiAgentBatch":
        """The same env steps and episodes with other per-policy batches."""
        return MultiAgentBatch(policy_batches, self.env_steps, self.episodes, self.count_steps_by, self.env_faults,
                               self.policy_episodes)

    def select_policies(self, policy_ids: Iterable[str]) -> "MultiAgentBatch":
        keep = set(policy_ids)
        return self.with_policy_batches({p: b for p, b in self.policy_batches.items() if p in keep})

    @staticmethod
    def concat(batches: Sequence["MultiAgentBatch"]) -> "MultiAgentBatch":
        """The rows of all `batches`, policy by policy, in order; env steps and episodes added up."""
        batches = list(batches)
        if len(batches) == 1:
            return batches[0]
        policy_ids = list(dict.fromkeys(p for b in batches for p in b.policy_batches))
        merged = {p: SampleBatch.concat([b.policy_batches[p] for b in batches if p in b.policy_batches])
                  for p in policy_ids}
        policy_episodes: dict[str, list[tuple[float, int]]] = {}
        for b in batches:
            for pid, episodes in b.policy_episodes.items():
                policy_episodes.setdefault(pid, []).extend(episodes)
        return MultiAgentBatch(merged, sum(b.env_steps for b in batches), [e for b in batches for e in b.episodes],
                               batches[0].count_steps_by, sum(b.env_faults for b in batches), policy_episodes)


def concat_batches(batches: Sequence[Any]) -> Any:
    """SampleBatch.concat or MultiAgentBatch.concat, as the batches are."""
    batches = list(batches)
    if batches and isinstance(batches[0], MultiAgentBatch):
        return MultiAgentBatch.concat(batches)
    return SampleBatch.concat(batches)


def per_policy(method: Callable[[Any, SampleBatch], SampleBatch]) -> Callable[[Any, Any], Any]:
    """Makes an operator's `__call__(self, batch: SampleBatch) -> SampleBatch` apply to each
    policy's batch of a MultiAgentBatch (and yield a MultiAgentBatch); a SampleBatch goes
    through as before. This is how the shaping operators become multi-agent."""

    @wraps(method)
    def call(self, batch):
        if isinstance(batch, MultiAgentBatch):
            return batch.with_policy_batches({p: method(self, b) for p, b in batch.policy_batches.items()})
        return method(self, batch)

    return call
