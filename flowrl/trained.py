"""Trained policies loaded from run directories and checkpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flowrl.checkpoints import _load_tensors, latest_checkpoint
from flowrl.planfile import ExperimentError
from flowrl.policy import TorchPolicy


def read_run_config(run_dir: Path) -> tuple[str, str, dict[str, Any]]:
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
        (name, spec), = data.items()
        return spec["env"], spec["plan"], spec["config"]
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing; is {run_dir} a flowrl run directory?") from None
    except (yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExperimentError(f"{path}: malformed run config ({type(e).__name__}: {e})") from None


class TrainedPolicy:
    """A policy loaded from a run directory or checkpoint, acting greedily by default.

    policy = flowrl.load_policy("runs/cartpole-ppo/latest")
    action = policy.compute_action(obs)
    """

    def __init__(self, policy: TorchPolicy, env: str, env_config: dict[str, Any]):
        self.policy = policy
        self.env = env
        self.env_config = env_config

    def compute_action(self, obs: Any, explore: bool = False) -> Any:
        from flowrl.policy import obs_to_array
        from flowrl.rollout import add_batch_dim

        batched = add_batch_dim(self.policy.observation_space, obs)
        out = self.policy.compute_actions(obs_to_array(self.policy.observation_space, batched), explore=explore)
        action = out.env_actions[0]
        return int(action) if np.ndim(action) == 0 else action

    def evaluate(self, episodes: int, seed: int = 0) -> list[float]:
        from flowrl.rollout import evaluate_policy

        return evaluate_policy(self.policy, self.env, self.env_config, episodes, seed)


def load_policy(path: str | os.PathLike) -> TrainedPolicy:
    """The trained policy in a run directory (its newest checkpoint) or a checkpoint directory."""
    from flowrl.envs import make_vector_env

    checkpoint = latest_checkpoint(Path(path))
    run_dir = checkpoint.parent.parent
    env, _, config = read_run_config(run_dir)
    if env is None:
        raise ExperimentError(f"{run_dir}: the run trained from a dataset without naming an env; there is nothing "
                              "to evaluate it in")
    vec = make_vector_env(env, 1, config.get("env_config") or {})
    policy = TorchPolicy(vec.single_observation_space, vec.single_action_space, config.get("model"), seed=0)
    vec.close()
    try:
        policy.model.load_state_dict(_load_tensors(checkpoint / "model.pt"))
    except RuntimeError as e:
        raise ExperimentError(f"{checkpoint / 'model.pt'}: does not fit the run's model ({str(e).splitlines()[0]})") \
            from None
    return TrainedPolicy(policy, env, config.get("env_config") or {})


def plan_defaults() -> dict[str, dict[str, Any]]:
    from flowrl.plans import BUILTIN_PLANS

    return {name: dataclasses.asdict(spec.config_class()) for name, spec in BUILTIN_PLANS.items()}
