"""Typed configuration: dataclasses with defaults, strict validation, one-line errors.

Every plan has a config dataclass derived from `CommonConfig`. `parse_config` builds one from
a mapping (a YAML `config:` section) and rejects unknown keys (with a suggestion), wrong types
and impossible values, naming the key.

>>> cfg = parse_config(CommonConfig, {"num_workers": 2, "lr": 0.001})
>>> cfg.num_workers, cfg.lr
(2, 0.001)
>>> parse_config(CommonConfig, {"num_worker": 2})
Traceback (most recent call last):
...
flowrl.config.ConfigError: config.num_worker: unknown key; did you mean 'num_workers'?
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value. `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


Schedule = list  # [[timestep, value], ...], piecewise linear
# Dataset formats the output connector writes, with the compressions each one takes.
OUTPUT_COMPRESSIONS = {"parquet": ("zstd", "snappy", "gzip", "lz4", "brotli", "none"),
                       "arrow": ("zstd", "lz4", "none")}


@dataclass
class CommonConfig:
    """Settings every plan shares (RLlib's names where RLlib has one)."""

    # Rollouts
    num_workers: int = 0                     # remote rollout workers; 0 samples in the driver
    num_envs_per_worker: int = 8
    rollout_fragment_length: int = 32        # steps per sub-env per sample() call
    vectorization: str = "auto"              # auto | sync | async
    env_config: dict = field(default_factory=dict)
    env_wrappers: list = field(default_factory=list)  # per sub-env wrappers and presets (flowrl.env_pipeline)
    num_cpus_per_worker: float = 1.0
    max_actor_restarts: int = 3
    restart_failed_sub_environments: bool = False  # a sub-env that raises is made anew, its episode dropped
    actor_start_timeout_s: float = 60.0      # Ray: how long actors may take to be placed and constructed
    worker_placement_strategy: str = "SPREAD"  # Ray: SPREAD DEFAULT PACK STRICT_PACK STRICT_SPREAD (flowrl.cluster)
    runtime_env: dict | None = None          # Ray job's runtime_env on joining a cluster; null: ship module:Class code
    # Model and optimisation
    model: dict = field(default_factory=lambda: {"hidden": [64, 64], "activation": "tanh"})
    lr: float = 3e-4
    lr_schedule: Schedule | None = None      # [[timestep, lr], ...], overrides lr when given; applied by the
                                             # LearningRateSchedule operator (every built-in plan has one)
    gamma: float = 0.99
    grad_clip: float | None = 0.5
    # The learner (flowrl.device): rollout workers always act on the CPU
    num_gpus: float = 0.0                    # GPUs the learner reserves (Ray Tune: in the trial's bundle)
    learner_device: str = "auto"             # auto (cuda when num_gpus > 0 and CUDA is there) | cpu | cuda | cuda:N
    num_learner_threads: int | None = None   # torch threads of the learner; null: flowrl.device.default_learner_threads
    # Experience from external applications (connectors.external) instead of sampling `env`
    input: str | None = None                 # null: workers sample env; external: a policy server for clients
    external: dict = field(default_factory=dict)  # its settings (flowrl.wire.ExternalConfig): host, port, ...
    # Recording what is sampled (connectors.output): a Parquet or Arrow IPC dataset directory
    output: str | None = None
    output_format: str = "parquet"           # parquet | arrow
    output_max_rows_per_file: int = 100_000
    output_compression: str = "zstd"         # parquet: zstd snappy gzip lz4 brotli none; arrow: zstd lz4 none
    # Reporting and checkpoints
    min_time_s_per_iteration: float = 0.0
    checkpoint_freq: int = 20                # iterations between checkpoints (0: only at the end)
    seed: int | None = None
    # Multi-agent envs (flowrl.multi_agent): policies, policy_mapping, policies_to_train
    multiagent: dict | None = None
    count_steps_by: str = "env_steps"        # env_steps | agent_steps: what batch sizes count (multi-agent)

    def validate(self) -> None:
        positive_ints = ("num_envs_per_worker", "rollout_fragment_length")
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "max_actor_restarts", "checkpoint_freq"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.vectorization not in ("auto", "sync", "async"):
            raise ConfigError("vectorization", f"must be auto, sync or async, got {self.vectorization!r}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError("gamma", f"must be in [0, 1], got {self.gamma}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("grad_clip", f"must be > 0 or null, got {self.grad_clip}")
        if self.num_learner_threads is not None and self.num_learner_threads < 1:
            raise ConfigError("num_learner_threads", f"must be >= 1 or null, got {self.num_learner_threads}")
        if self.num_gpus < 0:
            raise ConfigError("num_gpus", f"must be >= 0, got {self.num_gpus}")
        check_learner_device(self.learner_device)
        if self.multiagent is not None and (self.learner_device not in ("auto", "cpu") or self.num_gpus):
            raise ConfigError("learner_device", "a GPU learner is not supported with multiagent yet")
        if self.num_cpus_per_worker <= 0:
            raise ConfigError("num_cpus_per_worker", f"must be > 0, got {self.num_cpus_per_worker}")
        if not self.actor_start_timeout_s > 0:
            raise ConfigError("actor_start_timeout_s", f"must be > 0, got {self.actor_start_timeout_s}")
        check_schedule("lr_schedule", self.lr_schedule)
        from flowrl.env_pipeline import EnvPipeline, with_plan_gamma

        self.env_wrappers = with_plan_gamma(self.env_wrappers, self.gamma)
        EnvPipeline.parse(self.env_wrappers)
        if self.env_wrappers and self.input == "external":
            raise ConfigError("env_wrappers", "must be empty with input: external (clients step their own envs)")
        from flowrl.cluster import check_cluster_config

        check_cluster_config(self.worker_placement_strategy, self.runtime_env)
        self.check_input()
        if self.count_steps_by not in ("env_steps", "agent_steps"):
            raise ConfigError("count_steps_by", f"must be env_steps or agent_steps, got {self.count_steps_by!r}")
        if self.multiagent is not None:
            from flowrl.multi_agent import parse_multiagent

            parse_multiagent(self.multiagent)
            for key in ("env_wrappers", "input"):  # single-agent only, so far (datasets: see check_input)
                if getattr(self, key) and not (key == "input" and self.reads_datasets):
                    raise ConfigError(key, "is not supported with multiagent yet")
        if self.output_format not in OUTPUT_COMPRESSIONS:
            raise ConfigError("output_format", f"must be one of {', '.join(OUTPUT_COMPRESSIONS)}, "
                                               f"got {self.output_format!r}")
        if self.output_compression not in OUTPUT_COMPRESSIONS[self.output_format]:
            raise ConfigError("output_compression", f"for {self.output_format} must be one of "
                                                    f"{', '.join(OUTPUT_COMPRESSIONS[self.output_format])}, "
                                                    f"got {self.output_compression!r}")
        if self.output_max_rows_per_file < 1:
            raise ConfigError("output_max_rows_per_file", f"must be >= 1, got {self.output_max_rows_per_file}")
        unknown = set(self.model) - {"hidden", "activation", "custom_model"}
        custom = self.model.get("custom_model")
        if unknown and not custom:
            key = sorted(unknown)[0]
            raise ConfigError(f"model.{key}", "unknown key" + suggest(key, ["hidden", "activation", "custom_model"]))

    reads_datasets = False  # offline plans (BC, MARWIL): `input` is a dataset, multi-agent ones too

    def check_input(self) -> None:
        """`input` is null or external (with `external` its settings); offline plans, which read
        datasets, override this."""
        if self.input not in (None, "external"):
            raise ConfigError("input", f"must be null or external, got {self.input!r} (datasets are read by the "
                                       "offline plans, BC and MARWIL)")
        if self.input != "external":
            if self.external:
                raise ConfigError("external", "settings of the policy server, but input is not external")
            return
        from flowrl.wire import ExternalConfig

        settings = parse_config(ExternalConfig, self.external, prefix="external")
        if self.num_workers:
            raise ConfigError("num_workers", "must be 0 with input: external (clients step their own envs)")
        rows = self.num_envs_per_worker * self.rollout_fragment_length
        if settings.max_buffered_rows is not None and settings.max_buffered_rows < rows:
            raise ConfigError("external.max_buffered_rows", f"{settings.max_buffered_rows} is less than one sample "
                                                            f"(num_envs_per_worker x rollout_fragment_length = {rows})")

    def worker_kwargs(self, env: str) -> dict[str, Any]:
        policy, policy_config = self.policy_spec()
        return dict(env=env, num_envs_per_worker=self.num_envs_per_worker,
                    rollout_fragment_length=self.rollout_fragment_length, env_config=self.env_config,
                    vectorization=self.vectorization, model=self.model, seed=self.seed, lr=self.lr,
                    policy=policy, policy_config=policy_config,
                    restart_failed_sub_environments=self.restart_failed_sub_environments,
                    env_wrappers=self.env_wrappers, **self.multiagent_kwargs())

    def multiagent_kwargs(self) -> dict[str, Any]:
        """What a multi-agent rollout worker needs beyond a single-agent one's (nothing without
        `multiagent`: the worker is then a single-agent RolloutWorker)."""
        if self.multiagent is None:
            return {}
        return dict(multiagent=self.multiagent, count_steps_by=self.count_steps_by)

    def policy_spec(self) -> tuple[str, dict[str, Any]]:
        """The policy class the workers build (a name in flowrl.policy.POLICY_CLASSES) and the
        options of its own; off-policy plans override this."""
        return "TorchPolicy", {}


def check_learner_device(learner_device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", learner_device):
        raise ConfigError("learner_device", f"must be auto, cpu, cuda or cuda:N, got {learner_device!r}")


def check_schedule(key: str, schedule: Any) -> None:
    if schedule is None:
        return
    ok = isinstance(schedule, list) and schedule and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
        for p in schedule)
    if not ok:
        raise ConfigError(key, "must be a list of [timestep, value] pairs, e.g. [[0, 0.001], [100000, 0.0]]")
    steps = [p[0] for p in schedule]
    if steps != sorted(steps):
        raise ConfigError(key, "timesteps must increase")


def schedule_value(schedule: list | None, timestep: float, default: float) -> float:
    """Piecewise-linear interpolation; the end values hold outside the points.

    >>> schedule_value([[0, 1.0], [100, 0.0]], 25, default=9.0)
    0.75
    """
    if not schedule:
        return default
    if timestep <= schedule[0][0]:
        return float(schedule[0][1])
    for (t0, v0), (t1, v1) in zip(schedule, schedule[1:]):
        if timestep <= t1:
            return float(v0 + (v1 - v0) * (timestep - t0) / max(t1 - t0, 1e-12))
    return float(schedule[-1][1])


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             list: "a list"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(key, "must not be null")
    if origin is not None:
        tp = origin
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp in (bool, str, dict, list):
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    return value


def parse_config(cls: type, data: dict[str, Any] | None, prefix: str = "config") -> Any:
    """An instance of dataclass `cls` from `data`, checked key by key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{prefix}.{key}", "unknown key" + suggest(str(key), names))
        values[key] = _check_type(f"{prefix}.{key}", value, hints[key])
    config = cls(**values)
    try:
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e.key}", e.message) from None
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
