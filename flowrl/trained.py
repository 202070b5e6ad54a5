"""Trained policies loaded from run directories and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from flowrl.checkpoints import _load_tensors, added_policies, is_checkpoint_dir, load_normalizer, newest_readable
from flowrl.env_pipeline import EnvPipeline, TrainingTransform, frozen_observations
from flowrl.normalize import Normalizer
from flowrl.planfile import ExperimentError, FlowrlWarning
from flowrl.policy import TorchPolicy, make_policy


def read_run_config(run_dir: Path) -> tuple[str, str, dict[str, Any]]:
    return _read_run_yaml(run_dir)[:3]


def _read_run_yaml(run_dir: Path) -> tuple[str, str, dict[str, Any], str]:
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
        (name, spec), = data.items()
        return spec["env"], spec["plan"], spec["config"], str(name)
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing; is {run_dir} a flowrl run directory?") from None
    except (yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExperimentError(f"{path}: malformed run config ({type(e).__name__}: {e})") from None


def run_description(checkpoint: Path) -> tuple[str | None, str, dict[str, Any], str]:
    """The env, plan, config and experiment name a checkpoint was trained with: its algorithm.json
    (a checkpoint saved anywhere by Algorithm.save describes itself), else its run directory's
    config.yaml."""
    path = Path(checkpoint) / "algorithm.json"
    if not path.is_file():
        return _read_run_yaml(Path(checkpoint).parent.parent)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data["config"], dict) or not isinstance(data["plan"], str):
            raise TypeError("plan or config of the wrong type")
        return data["env"], data["plan"], data["config"], str(data["name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


class TrainedPolicy:
    """A policy loaded from a run directory or checkpoint, acting greedily by default.

    policy = flowrl.load_policy("runs/cartpole-ppo/latest")
    action = policy.compute_action(obs)

    `obs` is an observation of the env with the run's env_wrappers (`make_env()` makes one); the
    normalize preset's statistics, saved with the checkpoint, are applied to it frozen.
    """

    def __init__(self, policy: TorchPolicy, env: str, env_config: dict[str, Any], checkpoint: Path | None = None,
                 pipeline: EnvPipeline | None = None, normalizer: Normalizer | None = None,
                 team: dict[str, TorchPolicy] | None = None, policy_id: str | None = None,
                 multiagent: dict[str, Any] | None = None):
        """A policy of a multi-agent run also has its `team` (every policy of the run, by id),
        its `policy_id` and the run's `multiagent` section: it is evaluated playing with them."""
        self.policy = policy
        self.team, self.policy_id, self.multiagent = team, policy_id, multiagent
        self.env = env
        self.env_config = env_config
        self.checkpoint = checkpoint  # the checkpoint directory it was loaded from
        self.pipeline = pipeline or EnvPipeline()
        self.normalizer = normalizer

    def make_env(self):
        """One env as the policy was trained in: the run's env, env_config and env_wrappers."""
        from flowrl.envs import make_env

        return make_env(self.env, self.env_config, self.pipeline)

    def compute_action(self, obs: Any, explore: bool = False) -> Any:
        from flowrl.policy import obs_to_array
        from flowrl.rollout import add_batch_dim

        batched = frozen_observations(self.normalizer, add_batch_dim(self.policy.observation_space, obs))
        out = self.policy.compute_actions(obs_to_array(self.policy.observation_space, batched), explore=explore)
        action = out.env_actions[0]
        return int(action) if np.ndim(action) == 0 else action

    def evaluate(self, episodes: int, seed: int = 0) -> list[float]:
        from flowrl.rollout import evaluate_policy

        if self.env is None:  # trained by external clients from spaces given in its config
            raise ExperimentError(f"{self.checkpoint}: the run names no env to evaluate its policy in")
        if self.team is not None:  # the returns of this policy's agents, the whole team acting greedily
            from flowrl.multi_agent_rollout import evaluate_multi_agent

            return evaluate_multi_agent(self.team, self.env, self.env_config, self.multiagent, episodes, seed)[1][
                self.policy_id]
        return evaluate_policy(self.policy, self.env, self.env_config, episodes, seed, pipeline=self.pipeline,
                               normalizer=self.normalizer)


def resolve_run_path(path: str | os.PathLike) -> Path:
    """A run or checkpoint directory as given; an experiment directory (runs/<experiment>/, holding
    timestamped runs) stands for its `latest` run."""
    path = Path(path)
    if not path.exists():
        raise ExperimentError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ExperimentError(f"{path}: not a directory; expected a run, checkpoint or experiment directory")
    if is_checkpoint_dir(path) or (path / "config.yaml").is_file():
        return path
    if (path / "latest" / "config.yaml").is_file():
        return path / "latest"
    runs = sorted(p.name for p in path.iterdir() if p.name != "latest" and (p / "config.yaml").is_file())
    if runs:
        raise ExperimentError(f"{path}: an experiment directory without a `latest` run; give one of its runs, "
                              f"such as {path / runs[-1]}")
    return path  # not a run directory: the search for checkpoints says so


def checkpoint_at(path: str | os.PathLike, read: Callable[[Path], Any]) -> tuple[Path, Any]:
    """The checkpoint a path names, and what `read` reads of it: a checkpoint directory; a run
    directory's newest readable checkpoint (with a one-line warning when a newer one cannot be
    read); an experiment directory's `latest` run's."""
    path = resolve_run_path(path)
    if is_checkpoint_dir(path):
        return path, read(path)
    checkpoint, state, skipped = newest_readable(path, read)
    if skipped is not None:
        warnings.warn(f"{skipped}; using the newest readable checkpoint, {checkpoint}", FlowrlWarning, stacklevel=3)
    return checkpoint, state


def _read_model(checkpoint: Path) -> Any:
    return _load_tensors(checkpoint / "model.pt")


def load_policy(path: str | os.PathLike, policy: str | None = None) -> TrainedPolicy:
    """The trained policy in a run directory (its newest readable checkpoint, with a warning when
    a newer one cannot be read), a checkpoint directory, or an experiment directory (its `latest`).
    A multi-agent run has several: `policy` names the one to load."""
    from flowrl.envs import make_vector_env

    checkpoint, state = checkpoint_at(path, _read_model)
    run_dir = checkpoint.parent.parent
    env, plan_name, config, _ = run_description(checkpoint)
    if config.get("multiagent") is not None:
        return _load_team_policy(checkpoint, state, env, plan_name, config, policy)
    if policy is not None:
        raise ExperimentError(f"{checkpoint}: a single-agent run; it has no policy {policy!r} to choose")
    given = (config.get("external") or {}) if config.get("input") == "external" else {}
    if env is None and given.get("observation_space") is None:
        raise ExperimentError(f"{run_dir}: the run trained from a dataset without naming an env; there is nothing "
                              "to evaluate it in")
    pipeline, normalizer = None, None
    if env is None:  # external clients trained it, with the spaces its config gives
        from flowrl.spaces import space_from_spec

        try:
            spaces = space_from_spec(given["observation_space"]), space_from_spec(given["action_space"])
        except (KeyError, ValueError) as e:
            raise ExperimentError(f"{run_dir / 'config.yaml'}: config.external: {e}") from None
    else:
        pipeline = _run_pipeline(run_dir, config)
        vec = make_vector_env(env, 1, config.get("env_config") or {}, pipeline=pipeline)
        spaces = vec.single_observation_space, vec.single_action_space
        normalizer = vec.normalizer if isinstance(vec, TrainingTransform) else None
        vec.close()
        if normalizer is not None:  # the statistics the policy was trained with, frozen
            load_normalizer(_load_tensors(checkpoint / "normalize.pt"), normalizer, checkpoint / "normalize.pt")
    policy_class, options = run_policy_spec(run_dir, plan_name, config)
    policy = make_policy(policy_class, *spaces, model=config.get("model"), seed=0, **options)
    try:
        policy.model.load_state_dict(state)
    except RuntimeError as e:
        raise ExperimentError(f"{checkpoint / 'model.pt'}: does not fit the run's model ({str(e).splitlines()[0]})") \
            from None
    return TrainedPolicy(policy, env, config.get("env_config") or {}, checkpoint, pipeline, normalizer)


def _load_team_policy(checkpoint: Path, state: dict[str, Any], env: str, plan_name: str, config: dict[str, Any],
                      policy_id: str | None) -> TrainedPolicy:
    """Policy `policy_id` of a multi-agent run, with the run's other policies as its team."""
    from flowrl.multi_agent_rollout import MultiAgentRolloutWorker

    policy_class, options = run_policy_spec(checkpoint.parent.parent, plan_name, config)
    worker = MultiAgentRolloutWorker(env, config["multiagent"], env_config=config.get("env_config") or {},
                                     model=config.get("model"), seed=0, sample=False, num_threads=None,
                                     policy=policy_class, policy_config=options)
    for pid, like in _added_policies(checkpoint).items():  # self-play snapshots: copies, weights below
        if like not in worker.policies:
            raise ExperimentError(f"{checkpoint}: added policy {pid!r} is a copy of {like!r}, which the run has no "
                                  "policy of")
        worker.add_policy(pid, like)
    team = worker.policies
    if policy_id is None or policy_id not in team:
        given = "give one" if policy_id is None else f"it has no policy {policy_id!r}"
        raise ExperimentError(f"{checkpoint}: a multi-agent run of policies {', '.join(team)}; {given} "
                              "(policy=... / --policy)")
    for pid, member in team.items():
        try:
            member.model.load_state_dict(state[pid])
        except (KeyError, RuntimeError) as e:
            raise ExperimentError(f"{checkpoint / 'model.pt'}: policy {pid!r} does not fit the run's model "
                                  f"({str(e).splitlines()[0]})") from None
    return TrainedPolicy(team[policy_id], env, config.get("env_config") or {}, checkpoint, team=team,
                         policy_id=policy_id, multiagent=config["multiagent"])


def _added_policies(checkpoint: Path) -> dict[str, str]:
    """{policy id: the policy it copies} of the policies the run's plan added (progress.json)."""
    path = checkpoint / "progress.json"
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return added_policies(progress if isinstance(progress, dict) else {}, path)


def _run_pipeline(run_dir: Path, config: dict[str, Any]) -> EnvPipeline:
    from flowrl.config import ConfigError

    try:
        return EnvPipeline.parse(config.get("env_wrappers"), key="config.env_wrappers")
    except ConfigError as e:
        raise ExperimentError(f"{Path(run_dir) / 'config.yaml'}: {e}") from None


def run_policy_spec(run_dir: Path, plan_name: str, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The policy class a run trained (QPolicy for DQN, ...) and its options, from its config."""
    from flowrl.config import ConfigError, parse_config
    from flowrl.plans import resolve_plan

    try:
        spec = resolve_plan(plan_name)
    except ValueError:
        return "TorchPolicy", {}  # a user's plan that no longer imports: plans of their own use the default policy
    try:
        return parse_config(spec.config_class, config).policy_spec()
    except ConfigError as e:
        raise ExperimentError(f"{Path(run_dir) / 'config.yaml'}: {e}") from None


def plan_defaults() -> dict[str, dict[str, Any]]:
    from flowrl.plans import BUILTIN_PLANS

    return {name: dataclasses.asdict(spec.config_class()) for name, spec in BUILTIN_PLANS.items()}
