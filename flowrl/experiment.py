"""Plan files (YAML in the shape of RLlib's tuned examples), runs, checkpoints and trained policies.

```yaml
cartpole-ppo:
  env: CartPole-v1
  run: PPO                 # or plan: PPO, or plan: mypkg.plans:my_plan
  stop: {episode_return_mean: 475, timesteps_total: 100000}
  config: {num_workers: 2, lr: 0.0003}
```
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import yaml

from flowrl.config import ConfigError, config_to_dict, parse_config, suggest
from flowrl.envs import EnvError, check_env_id
from flowrl.executors import make_executor
from flowrl.policy import TorchPolicy

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


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, plan, workers) -> Path:
    """checkpoints/checkpoint_NNNNNN/: model.pt, optimizer.pt (tensors, loaded with
    weights_only=True), progress.json. Written to a temporary directory, then renamed."""
    policy = workers.policy
    progress = plan.progress_state()
    name = f"checkpoint_{progress['training_iteration']:06d}"
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(policy.model.state_dict(), tmp / "model.pt")
    torch.save(policy.optimizer.state_dict(), tmp / "optimizer.pt")
    target = getattr(policy, "target_model", None)
    if target is not None:
        torch.save(target.state_dict(), tmp / "target_model.pt")
    progress["weights_version"] = policy.weights_version
    (tmp / "progress.json").write_text(json.dumps(progress))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(path: Path) -> Path:
    """The checkpoint directory itself, or the newest one under a run directory."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("checkpoint_*")) if (path / "checkpoints").is_dir() else []
    if not candidates:
        raise ExperimentError(f"{path}: no checkpoint found (expected checkpoints/checkpoint_*/model.pt)")
    return candidates[-1]


def _load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # a truncated or tampered file
        raise ExperimentError(f"{path}: cannot be read as a tensor checkpoint ({type(e).__name__}: {e})") from None


def restore_checkpoint(checkpoint: Path, plan, workers) -> None:
    policy = workers.policy
    try:
        policy.model.load_state_dict(_load_tensors(checkpoint / "model.pt"))
        policy.optimizer.load_state_dict(_load_tensors(checkpoint / "optimizer.pt"))
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, ExperimentError):
            raise
        raise ExperimentError(f"{checkpoint}: does not fit this plan's model ({str(e).splitlines()[0]})") from None
    try:
        progress = json.loads((checkpoint / "progress.json").read_text())
        policy.weights_version = int(progress["weights_version"])
        plan.restore_progress(progress)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{checkpoint / 'progress.json'}: unreadable ({type(e).__name__}: {e})") from None
    if (checkpoint / "target_model.pt").is_file():
        import copy

        policy.target_model = copy.deepcopy(policy.model).requires_grad_(False)
        policy.target_model.load_state_dict(_load_tensors(checkpoint / "target_model.pt"))
    workers.sync_weights()


# ---- metrics -------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


class MetricsWriter:
    """metrics.jsonl (one object per iteration), progress.csv, and TensorBoard events."""

    def __init__(self, run_dir: Path):
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.csv_path = run_dir / "progress.csv"
        self.csv_file: TextIO | None = None
        self.csv: csv.DictWriter | None = None
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir))

    def write(self, result: dict[str, Any]) -> None:
        row = {}
        for key, value in result.items():  # nested dicts (operator_time_s) become "key/name"
            if isinstance(value, dict):
                row.update({f"{key}/{name}": _jsonable(v) for name, v in value.items()})
            else:
                row[key] = _jsonable(value)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.csv is None:
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            self.csv_file = open(self.csv_path, "a", newline="")
            self.csv = csv.DictWriter(self.csv_file, fieldnames=list(row), extrasaction="ignore")
            if new:
                self.csv.writeheader()
        self.csv.writerow(row)
        self.csv_file.flush()
        step = int(result.get("timesteps_total") or result.get("training_iteration", 0))
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)

    def close(self, flush_tensorboard: bool = True) -> None:
        self.jsonl.close()
        if self.csv_file is not None:
            self.csv_file.close()
        if flush_tensorboard:
            self.tb.close()


# ---- progress line -------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def progress_line(name: str, r: dict[str, Any]) -> str:
    ret = r.get("episode_return_mean")
    ret_text = f"{ret:8.2f}" if ret is not None else "     n/a"
    evaluation = r.get("evaluation")
    eval_text = f" | eval {evaluation['episode_return_mean']:8.2f}" if isinstance(evaluation, dict) else ""
    return (f"{name} | iter {r['training_iteration']:5d} | steps {r['timesteps_total']:>10,} | return {ret_text}"
            f"{eval_text} | {r['env_steps_per_s']:>9,.0f} steps/s | {_clock(r['time_total_s'])}")


class Progress:
    """One live line on a terminal; on anything else a line every `every_s` seconds."""

    def __init__(self, stream: TextIO, quiet: bool, every_s: float = 10.0):
        self.stream, self.quiet, self.every_s = stream, quiet, every_s
        self.tty = stream.isatty()
        self.last = 0.0

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif time.monotonic() - self.last >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = time.monotonic()

    def finish(self, text: str) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


# ---- running -------------------------------------------------------------------------------------
class _GracefulInterrupt:
    """The first Ctrl-C asks the run to stop after the current iteration (checkpoint, clean
    close); a second one interrupts at once."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.requested = False
        self.forced = False
        self.previous = None

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        self.progress.finish("Ctrl-C: stopping after this iteration (Ctrl-C again to stop now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
def new_run_dir(output_dir: Path, name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = output_dir / name / stamp
    suffix = 1
    while run_dir.exists():
        run_dir = output_dir / name / f"{stamp}_{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    latest = output_dir / name / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    except OSError:
        pass  # a convenience only
    return run_dir


def run_experiment(exp: Experiment, output_dir: Path, executor_kind: str = "local", address: str | None = None,
                   quiet: bool = False, resume_dir: Path | None = None, stream: TextIO | None = None,
                   num_cpus: int | None = None) -> dict[str, Any]:
    """Train until a stop condition holds; return the last result (with "stop_reason")."""
    from flowrl.rollout import WorkerSet

    config = exp.config
    if resume_dir is not None:
        checkpoint = latest_checkpoint(resume_dir)
        run_dir = Path(resume_dir)
    else:
        checkpoint = None
        run_dir = new_run_dir(Path(output_dir), exp.name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(exp.resolved(), sort_keys=False))
    executor = make_executor("ray", address=address, num_cpus=num_cpus) if executor_kind == "ray" else \
        make_executor("local")
    worker_kwargs = config.worker_kwargs(exp.env)
    if exp.env is None:  # an offline plan without an env: the policy is built from the dataset's spaces
        spaces = _check_input(exp.plan, config, None, exp.source)
        worker_kwargs.update(observation_space=spaces["obs"], action_space=spaces["actions"])
    output = None
    if config.output:
        from flowrl.connectors import DatasetWriter

        output = DatasetWriter(config.output, config.output_format, config.output_max_rows_per_file,
                               config.output_compression)
    workers = WorkerSet(num_workers=config.num_workers, num_cpus_per_worker=config.num_cpus_per_worker,
                        max_restarts=config.max_actor_restarts, output=output, **worker_kwargs)
    plan = exp.plan.build(workers, config)
    plan.executor = executor
    metrics = MetricsWriter(run_dir)
    progress = Progress(stream or sys.stdout, quiet)
    result: dict[str, Any] = {}
    reason = None
    with _GracefulInterrupt(progress) as interrupt:
        try:
            with plan:
                if checkpoint is not None:
                    restore_checkpoint(checkpoint, plan, workers)
                while True:
                    result = plan.step()
                    metrics.write(result)
                    progress.update(progress_line(exp.name, result))
                    reason = stop_reason(exp.stop, result)
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    if config.checkpoint_freq and result["training_iteration"] % config.checkpoint_freq == 0 \
                            and not reason:
                        save_checkpoint(run_dir, plan, workers)
                    if reason:
                        break
                save_checkpoint(run_dir, plan, workers)
        except KeyboardInterrupt:
            if result:
                save_checkpoint(run_dir, plan, workers)  # nothing lost: resume with --resume RUN_DIR
            progress.finish(f"{exp.name}: interrupted; checkpoint saved in {run_dir}")
            raise
        finally:
            # After a second Ctrl-C the TensorBoard writer may have been cut off mid-write;
            # waiting for its queue could then hang, so only our own files are closed.
            metrics.close(flush_tensorboard=not interrupt.forced)
            executor.close()
            workers.local_worker.close()
            if output is not None:
                output.close()
    result["stop_reason"] = reason
    result["run_dir"] = str(run_dir)
    ret = result.get("episode_return_mean")
    evaluation = result_value(result, "evaluation/episode_return_mean")
    eval_text = f", greedy evaluation return {evaluation:.2f}" if evaluation is not None else ""
    progress.finish(f"{exp.name}: done at iteration {result['training_iteration']} ({reason}); "
                    f"{result['timesteps_total']:,} env steps in {_clock(result['time_total_s'])}, "
                    f"episode_return_mean {'n/a' if ret is None else f'{ret:.2f}'}{eval_text}; run dir {run_dir}")
    return result


# ---- trained policies ----------------------------------------------------------------------------
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
