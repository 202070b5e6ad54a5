"""Plan files (YAML in the shape of RLlib's tuned examples): parsing, overrides, stop conditions.

```yaml
cartpole-ppo:
  env: CartPole-v1
  run: PPO                 # or plan: PPO, or plan: mypkg.plans:my_plan
  stop: {episode_return_mean: 475, timesteps_total: 100000}
  config: {num_workers: 2, lr: 0.0003}
```
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from flowrl.config import ConfigError, config_to_dict, parse_config, suggest
from flowrl.envs import EnvError, check_env_id

EXPERIMENT_KEYS = ("env", "run", "plan", "stop", "config")
STOP_KEYS = ("episode_return_mean", "timesteps_total", "time_total_s", "training_iteration",
             "evaluation/episode_return_mean")
STOP_ALIASES = {"episode_reward_mean": "episode_return_mean"}


class ExperimentError(ValueError):
    """Bad input: a plan file, an override, a run directory or a checkpoint. One line."""


@dataclass
class Experiment:
    name: str
    env: str | None  # offline plans may train from a dataset alone
    plan_name: str
    plan: Any  # PlanSpec
    stop: dict[str, float]
    config: Any
    source: str

    def resolved(self) -> dict[str, Any]:
        return {self.name: {"env": self.env, "plan": self.plan_name, "stop": dict(self.stop),
                            "config": config_to_dict(self.config)}}


# ---- plan files ----------------------------------------------------------------------------------
def _set_override(spec: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in EXPERIMENT_KEYS:
        raise ExperimentError(f"{where}: --set {dotted}: unknown key {parts[0]!r}{suggest(parts[0], EXPERIMENT_KEYS)}")
    node = spec
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"{where}: --set {dotted}: {part!r} is not a mapping")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ExperimentError(f"--set {item!r}: expected KEY=VALUE, e.g. config.lr=0.001")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_experiments(path: str | os.PathLike, overrides: list[tuple[str, Any]] = (),
                     seed: int | None = None, num_workers: int | None = None) -> list[Experiment]:
    """Every experiment in a plan file, validated; the first problem raises ExperimentError
    naming the file, the experiment and the key."""
    from flowrl.plans import resolve_plan

    path = str(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ExperimentError(f"{path}: is a directory, expected a YAML plan file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise ExperimentError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or not data:
        raise ExperimentError(f"{path}: expected a mapping of experiment names to experiments")
    experiments = []
    for name, spec in data.items():
        where = f"{path}: experiment {name!r}"
        if not isinstance(spec, dict):
            raise ExperimentError(f"{where}: expected a mapping with env, run and stop")
        spec = json.loads(json.dumps(spec, default=str))  # a deep copy we may change
        for key, value in overrides:
            _set_override(spec, key, value, where)
        if seed is not None:
            spec.setdefault("config", {})["seed"] = seed
        if num_workers is not None:
            spec.setdefault("config", {})["num_workers"] = num_workers
        for key in spec:
            if key not in EXPERIMENT_KEYS:
                raise ExperimentError(f"{where}: {key}: unknown key{suggest(key, EXPERIMENT_KEYS)}")
        if "run" in spec and "plan" in spec:
            raise ExperimentError(f"{where}: give either run or plan, not both")
        plan_name = spec.get("plan", spec.get("run"))
        if plan_name is None:
            raise ExperimentError(f"{where}: run: missing (a plan name such as PPO, or 'package.module:function')")
        if not isinstance(plan_name, str):
            raise ExperimentError(f"{where}: run: expected a plan name, got {plan_name!r}")
        try:
            plan = resolve_plan(plan_name)
        except ValueError as e:
            raise ExperimentError(f"{where}: {'plan' if 'plan' in spec else 'run'}: {e}") from None
        env = spec.get("env")
        if env is None and plan.check_input is not None:
            pass  # an offline plan: the dataset's spaces suffice, and nothing is evaluated
        elif not isinstance(env, str) or not env:
            raise ExperimentError(f"{where}: env: missing (a gymnasium id such as CartPole-v1, or 'module:Class')")
        else:
            try:
                check_env_id(env)
            except EnvError as e:
                raise ExperimentError(f"{where}: env: {e}") from None
        stop = _parse_stop(spec.get("stop"), where)
        config_data = spec.get("config") or {}
        if not isinstance(config_data, dict):
            raise ExperimentError(f"{where}: config: expected a mapping")
        try:
            config = parse_config(plan.config_class, config_data)
        except ConfigError as e:
            raise ExperimentError(f"{where}: {e}") from None
        if plan.check_input is not None:
            _check_input(plan, config, env, where)
        experiments.append(Experiment(str(name), env, plan_name, plan, stop, config, path))
    return experiments


def env_spaces(env: str | None, env_config: dict[str, Any]) -> dict[str, Any] | None:
    """The obs/new_obs/actions spaces of an env, as batches name them."""
    if env is None:
        return None
    from flowrl.envs import make_vector_env

    vec = make_vector_env(env, 1, env_config)
    try:
        return {"obs": vec.single_observation_space, "new_obs": vec.single_observation_space,
                "actions": vec.single_action_space}
    finally:
        vec.close()


def _check_input(plan, config, env: str | None, where: str) -> dict[str, Any]:
    from flowrl.connectors import DatasetError

    try:
        return plan.check_input(config, env_spaces(env, config.env_config))
    except DatasetError as e:
        raise ExperimentError(f"{where}: config.input: {e}") from None
    except ConfigError as e:
        raise ExperimentError(f"{where}: config.{e}") from None
    except EnvError as e:
        raise ExperimentError(f"{where}: env: {e}") from None


def _parse_stop(stop: Any, where: str) -> dict[str, float]:
    if stop is None:
        raise ExperimentError(f"{where}: stop: missing; give at least one of {', '.join(STOP_KEYS)}")
    if not isinstance(stop, dict) or not stop:
        raise ExperimentError(f"{where}: stop: expected a mapping such as {{timesteps_total: 100000}}")
    out = {}
    for key, value in stop.items():
        name = STOP_ALIASES.get(key, key)
        if name not in STOP_KEYS:
            raise ExperimentError(f"{where}: stop.{key}: unknown stop key{suggest(str(key), STOP_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ExperimentError(f"{where}: stop.{key}: expected a number, got {value!r}")
        if not name.endswith("episode_return_mean") and value <= 0:
            raise ExperimentError(f"{where}: stop.{key}: must be > 0, got {value}")
        out[name] = float(value)
    return out


def result_value(result: dict[str, Any], key: str) -> Any:
    """`result[key]`, where "a/b" reads the nested `result["a"]["b"]`."""
    if key in result:
        return result[key]
    head, sep, rest = key.partition("/")
    inner = result.get(head) if sep else None
    return inner.get(rest) if isinstance(inner, dict) else None


def stop_reason(stop: dict[str, float], result: dict[str, Any]) -> str | None:
    for key, bound in stop.items():
        value = result_value(result, key)
        if value is not None and value >= bound:
            return f"{key} {value:.6g} >= {bound:.6g}"
    return None
