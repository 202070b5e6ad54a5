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

import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from flowrl.config import CommonConfig, ConfigError, config_to_dict, parse_config, suggest
from flowrl.envs import EnvError, check_env_id

EXPERIMENT_KEYS = ("env", "run", "plan", "stop", "config")
STOP_KEYS = ("episode_return_mean", "timesteps_total", "time_total_s", "training_iteration",
             "evaluation/episode_return_mean", "num_env_steps_sampled", "num_agent_steps_sampled")
STOP_ALIASES = {"episode_reward_mean": "episode_return_mean"}


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that 1e-4 is a number, as in JSON and YAML 1.2 (YAML 1.1, which
    PyYAML follows, wants 1.0e-4 and reads 1e-4 as a string)."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(stream: Any) -> Any:
    """YAML (or JSON) text or a file: plain data only, numbers written as JSON writes them included."""
    return yaml.load(stream, Loader=_YAMLLoader)


class ExperimentError(ValueError):
    """Bad input: a plan file, an override, a run directory or a checkpoint. One line."""


class ExperimentConfigError(ExperimentError, ConfigError):
    """A bad config or stop key: an ExperimentError to the command line (one line, exit 2) and a
    flowrl.ConfigError to Python callers; `key` is the dotted key ("config.lr")."""

    def __init__(self, where: str, error: ConfigError):
        self.key, self.message = error.key, error.message
        ValueError.__init__(self, f"{where}: {error}")


class FlowrlWarning(UserWarning):
    """Something flowrl worked around (an unreadable newest checkpoint, a truncated metrics line);
    the command line prints it as one line, `flowrl: warning: ...`."""


@dataclass
class Experiment:
    name: str
    env: str | None  # offline plans may train from a dataset alone
    plan_name: str
    plan: Any  # PlanSpec
    stop: dict[str, int | float]
    config: Any  # with search spaces: the config at each domain's first value
    source: str
    config_data: dict[str, Any] | None = None  # the config as given (search spaces included)
    search_space: dict[str, dict[str, Any]] | None = None  # dotted key -> {grid_search: [...]} and the like

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
            value = load_yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_experiments(path: str | os.PathLike, overrides: list[tuple[str, Any]] = (),
                     seed: int | None = None, num_workers: int | None = None,
                     search_spaces: bool = False) -> list[Experiment]:
    """Every experiment in a plan file, validated; the first problem raises ExperimentError
    naming the file, the experiment and the key. Tune search spaces in `config` are refused
    unless `search_spaces` (`flowrl tune`)."""
    path = str(path)
    try:
        with open(path) as f:
            data = load_yaml(f)
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
        experiments.append(parse_experiment(str(name), spec, where, path, search_spaces=search_spaces))
    return experiments


def make_experiment(run: Any, env: str | None = None, config: dict[str, Any] | None = None,
                    stop: dict[str, Any] | None = None, name: str | None = None, require_stop: bool = False,
                    search_spaces: bool = False) -> Experiment:
    """An experiment from Python values, checked as a plan file's would be: `run` is a plan name
    ("PPO", "package.module:function"), a plan function or a PlanSpec. A bad config or stop key
    raises ExperimentConfigError (a flowrl.ConfigError) naming it."""
    spec = {"run": run, "env": env, "config": dict(config or {})}
    if stop is not None:
        spec["stop"] = stop
    plan_name = _plan_label(run)
    name = name or default_experiment_name(env, plan_name)
    return parse_experiment(name, spec, f"{plan_name} on {env}" if env else plan_name, "<python>",
                            search_spaces=search_spaces, require_stop=require_stop)


def default_experiment_name(env: str | None, plan_name: str) -> str:
    """"<env>-<plan>" in lower case, as a directory name: CartPole-v1 and PPO give cartpole-v1-ppo."""
    label = f"{env}-{plan_name}" if env else plan_name
    return re.sub(r"[^a-z0-9_.-]+", "-", label.lower()).strip("-.") or "experiment"


def _plan_label(run: Any) -> str:
    if isinstance(run, str):
        return run
    name = getattr(run, "name", None)  # a PlanSpec
    if isinstance(name, str) and hasattr(run, "config_class"):
        return name
    return f"{getattr(run, '__module__', '?')}:{getattr(run, '__qualname__', repr(run))}"


def _resolve_run(run: Any):
    """The PlanSpec for a plan name, a PlanSpec or a plan function."""
    from flowrl.plans import PlanSpec, resolve_plan

    if isinstance(run, str):
        return resolve_plan(run)
    if isinstance(run, PlanSpec):
        return run
    if callable(run):
        return PlanSpec(_plan_label(run), getattr(run, "config_class", CommonConfig), run)
    raise ValueError(f"expected a plan name, a plan function or a PlanSpec, got {run!r}")


def parse_experiment(name: str, spec: dict[str, Any], where: str, source: str, search_spaces: bool = False,
                     require_stop: bool = True) -> Experiment:
    """One experiment (env, run or plan, stop, config), validated; `where` begins every error."""
    for key in spec:
        if key not in EXPERIMENT_KEYS:
            raise ExperimentError(f"{where}: {key}: unknown key{suggest(key, EXPERIMENT_KEYS)}")
    if "run" in spec and "plan" in spec:
        raise ExperimentError(f"{where}: give either run or plan, not both")
    run = spec.get("plan", spec.get("run"))
    if run is None:
        raise ExperimentError(f"{where}: run: missing (a plan name such as PPO, or 'package.module:function')")
    if source != "<python>" and not isinstance(run, str):
        raise ExperimentError(f"{where}: run: expected a plan name, got {run!r}")
    try:
        plan = _resolve_run(run)
    except ValueError as e:
        raise ExperimentError(f"{where}: {'plan' if 'plan' in spec else 'run'}: {e}") from None
    plan_name = _plan_label(run)
    env = spec.get("env")
    external = isinstance(spec.get("config"), dict) and spec["config"].get("input") == "external"
    if env is None and (plan.check_input is not None or external):
        pass  # an offline plan: the dataset's spaces suffice; external clients: config.external's spaces
    elif not isinstance(env, str) or not env:
        raise ExperimentError(f"{where}: env: missing (a gymnasium id such as CartPole-v1, or 'module:Class')")
    else:
        try:
            check_env_id(env)
        except EnvError as e:
            raise ExperimentError(f"{where}: env: {e}") from None
    stop = _parse_stop(spec.get("stop"), where) if require_stop or spec.get("stop") is not None else {}
    config_data = spec.get("config") or {}
    if not isinstance(config_data, dict):
        raise ExperimentError(f"{where}: config: expected a mapping")
    space = find_search_spaces(config_data)
    if space and not search_spaces:
        key, domain = next(iter(space.items()))
        use = "flowrl.tune" if source == "<python>" else f"`flowrl tune {source}`"
        raise ExperimentError(f"{where}: config.{key}: {{{next(iter(domain))}: ...}} is a Tune search space; "
                              f"run it with {use}")
    try:
        config = _check_search_space(plan.config_class, config_data, space) if space else \
            parse_config(plan.config_class, config_data)
    except ConfigError as e:
        raise ExperimentConfigError(where, e) from None
    if getattr(config, "multiagent", None) is not None and env is not None:
        _check_multiagent(plan, config, env, where)
    if external:
        given = (config_data.get("external") or {}).get("observation_space") is not None
        if given == (env is not None):
            raise ExperimentError(f"{where}: env: with input: external give either an env (its spaces are used; it is "
                                  "never stepped) or config.external.observation_space and action_space")
    if plan.check_input is not None:
        _check_input(plan, config, env, where)
    if getattr(plan, "check_env", None) is not None and (env is not None or external):
        _check_input(plan, config, env, where, check=plan.check_env)
    return Experiment(name, env, plan_name, plan, stop, config, source, config_data, space or None)


def _check_multiagent(plan, config, env: str, where: str) -> None:
    """config.multiagent against the plan and the env's agents: every agent maps to a policy,
    every policy has an agent (one env is made to learn its agents)."""
    from flowrl.multi_agent import check_policy_plans, parse_multiagent
    from flowrl.plans import BUILTIN_PLANS
    from flowrl.multi_agent_env import make_multi_agent_env

    try:
        made = make_multi_agent_env(env, config.env_config)
    except EnvError as e:
        raise ExperimentError(f"{where}: env: {e} (config.multiagent is given)") from None
    try:
        setup = parse_multiagent(config.multiagent).resolve(list(made.possible_agents))
        if getattr(plan, "name", None) in BUILTIN_PLANS:
            check_policy_plans(setup, plan.name)
    except ConfigError as e:
        raise ExperimentConfigError(where, e) from None
    finally:
        made.close()


def env_spaces(env: str | None, env_config: dict[str, Any], env_wrappers: list | None = None
               ) -> dict[str, Any] | None:
    """The obs/new_obs/actions spaces of an env (with its env_wrappers), as batches name them."""
    if env is None:
        return None
    from flowrl.env_pipeline import EnvPipeline
    from flowrl.envs import make_vector_env

    vec = make_vector_env(env, 1, env_config, pipeline=EnvPipeline.parse(env_wrappers))
    try:
        return {"obs": vec.single_observation_space, "new_obs": vec.single_observation_space,
                "actions": vec.single_action_space}
    finally:
        vec.close()


def experiment_spaces(config, env: str | None) -> dict[str, Any] | None:
    """The env's spaces; without an env, for input: external, those config.external gives;
    with config.multiagent, {policy id: spaces} (flowrl.multi_agent.policy_spaces)."""
    if env is None and getattr(config, "input", None) == "external":
        from flowrl.wire import ExternalConfig

        return parse_config(ExternalConfig, config.external, prefix="external").spaces()
    if env is not None and getattr(config, "multiagent", None) is not None:
        from flowrl.multi_agent import parse_multiagent, policy_spaces
        from flowrl.multi_agent_env import make_multi_agent_env

        made = make_multi_agent_env(env, config.env_config)
        try:
            return policy_spaces(made, parse_multiagent(config.multiagent).resolve(list(made.possible_agents)))
        finally:
            made.close()
    return env_spaces(env, config.env_config, config.env_wrappers)


def _check_input(plan, config, env: str | None, where: str, check=None) -> dict[str, Any]:
    """`check(config, env_spaces)` (default: the plan's check_input); its errors as one line."""
    from flowrl.connectors import DatasetError

    try:
        return (check or plan.check_input)(config, experiment_spaces(config, env))
    except DatasetError as e:
        raise ExperimentError(f"{where}: config.input: {e}") from None
    except ConfigError as e:
        raise ExperimentError(f"{where}: config.{e}") from None
    except EnvError as e:
        raise ExperimentError(f"{where}: env: {e}") from None


# ---- Tune search spaces ----------------------------------------------------------------------------
SEARCH_SPACE_KINDS = ("grid_search", "choice", "uniform", "loguniform")


def _search_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        (kind, _), = value.items()
        return kind if kind in SEARCH_SPACE_KINDS else None
    return None


def find_search_spaces(config: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """The search spaces in a config mapping, by dotted key: `{lr: {grid_search: [0.1, 0.01]}}`
    gives {"lr": {"grid_search": [0.1, 0.01]}}; mappings (model, env_config) are searched too."""
    found = {}
    for key, value in config.items():
        if _search_kind(value):
            found[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            found.update(find_search_spaces(value, f"{prefix}{key}."))
    return found


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with the value at a dotted key replaced."""
    head, _, rest = dotted.partition(".")
    out = dict(config)
    out[head] = set_dotted(config[head], rest, value) if rest else value
    return out


def _domain_points(key: str, domain: dict[str, Any], hints: dict[str, Any]) -> list[Any]:
    """The values that stand for a domain when it is checked: every value of a grid or a choice,
    the bounds of a range. A malformed domain raises ConfigError."""
    (kind, args), = domain.items()
    if kind in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"config.{key}", f"{kind}: expected a non-empty list of values, got {args!r}")
        return list(args)
    if (not isinstance(args, list) or len(args) != 2
            or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"config.{key}", f"{kind}: expected [low, high], two numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"config.{key}", f"{kind}: low must be below high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"config.{key}", f"loguniform: low must be > 0, got {low}")
    hint = hints.get(key)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if int in options and float not in options:
        raise ConfigError(f"config.{key}", f"{kind} samples fractional numbers, and {key} takes an integer; "
                                           "use choice or grid_search")
    return [float(low), float(high)]


def _check_search_space(config_class: type, data: dict[str, Any], space: dict[str, dict[str, Any]]) -> Any:
    """Every trial a search space can make, checked against the config's types and bounds: each
    combination of the grids, and each value of a choice (each bound of a range) with the other
    domains at their first value. Returns the config at every domain's first value."""
    hints = typing.get_type_hints(config_class)
    points = {key: _domain_points(key, domain, hints) for key, domain in space.items()}
    first = dict(data)
    for key, values in points.items():
        first = set_dotted(first, key, values[0])
    grids = [key for key, domain in space.items() if "grid_search" in domain]
    trials = [dict(zip(grids, combo)) for combo in itertools.product(*(points[k] for k in grids))]
    trials += [{key: value} for key in space if key not in grids for value in points[key][1:]]
    for trial in trials:
        candidate = first
        for key, value in trial.items():
            candidate = set_dotted(candidate, key, value)
        try:
            parse_config(config_class, candidate)
        except ConfigError as e:
            if len(trial) > 1:
                point = ", ".join(f"{k}={v!r}" for k, v in trial.items())
                raise ConfigError(e.key, f"{e.message} (in the grid point {point})") from None
            (key, value), = trial.items()
            kind = next(iter(space[key]))
            if e.key == f"config.{key}":
                raise ConfigError(e.key, f"{kind} value {value!r}: {e.message}") from None
            raise ConfigError(e.key, f"{e.message} (with config.{key} = {value!r} from its {kind})") from None
    return parse_config(config_class, first)


def _is_policy_return(key: Any) -> bool:
    """policy/<name>/episode_return_mean: a multi-agent run's return of one policy's agents."""
    parts = key.split("/") if isinstance(key, str) else []
    return len(parts) == 3 and parts[0] == "policy" and bool(parts[1]) and parts[2] == "episode_return_mean"


def _parse_stop(stop: Any, where: str) -> dict[str, int | float]:
    def bad(key: str, message: str) -> ExperimentConfigError:
        return ExperimentConfigError(where, ConfigError(key, message))

    if stop is None:
        raise bad("stop", f"missing; give at least one of {', '.join(STOP_KEYS)}")
    if not isinstance(stop, dict) or not stop:
        raise bad("stop", "expected a mapping such as {timesteps_total: 100000}")
    out = {}
    for key, value in stop.items():
        name = STOP_ALIASES.get(key, key)
        if name not in STOP_KEYS and not _is_policy_return(name):
            raise bad(f"stop.{key}", f"unknown stop key{suggest(str(key), STOP_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"stop.{key}", f"expected a number, got {value!r}")
        if not name.endswith("episode_return_mean") and value <= 0:
            raise bad(f"stop.{key}", f"must be > 0, got {value}")
        out[name] = value  # an int stays an int, so config.yaml says 100000, not 100000.0
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
