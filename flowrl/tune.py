"""Ray Tune: a flowrl plan as a Tune trainable, and the sweeps of `flowrl tune`.

    from ray import tune
    import flowrl.tune
    tuner = tune.Tuner(flowrl.tune.trainable("PPO", env="CartPole-v1", stop={"timesteps_total": 50_000}),
                       param_space={"lr": tune.grid_search([1e-3, 3e-4])},
                       tune_config=tune.TuneConfig(metric="episode_return_mean", mode="max"))
    results = tuner.fit()

Each trial is an Algorithm trained with the trial's config (checked as a plan file's is). It
reports every result record to Tune and, every `checkpoint_freq` iterations and at its stop, a
checkpoint (`ray.tune.report(metrics, checkpoint=...)`). A trial given a checkpoint
(`ray.tune.get_checkpoint()`: a restarted trial, or PBT's exploit, which hands it another
trial's) continues its weights, optimizer state, counters and plan state under its own config:
a learning rate PBT changed is the one the next iteration uses. Its resources are one
placement group: a bundle for the trial (the learner) and one per rollout worker, and the
workers are created inside it, so trials that start actors never wait on each other's CPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from flowrl.planfile import (Experiment, ExperimentConfigError, ExperimentError, _plan_label, _resolve_run,
                             make_experiment, result_value, set_dotted, stop_reason)

SCHEDULERS = ("fifo", "asha", "pbt")


# ---- the trainable ----------------------------------------------------------------------------
def trainable(plan: Any, env: str | None = None, stop: dict[str, Any] | None = None,
              output_dir: str | os.PathLike | None = None, name: str | None = None,
              checkpoint_freq: int | None = None):
    """A Tune function trainable for `plan` (a name such as "PPO", "package.module:function", a
    plan function or a PlanSpec) on `env` (or the trial config's "env" key, RLlib's habit).

    Each trial trains until `stop` holds (plan-file stop keys; a scheduler may stop it first).
    With `output_dir`, each trial keeps a flowrl run directory, <output_dir>/<trial name>/
    (config.yaml, metrics.jsonl, checkpoints/: `flowrl eval` works on it). `checkpoint_freq`
    overrides the config's (PBT wants one checkpoint per perturbation interval).

    Trials run in the driver's working directory, not Tune's trial directory, so that relative
    paths (datasets, user modules) mean what they mean to `flowrl run`: this sets
    RAY_CHDIR_TO_TRIAL_DIR=0 unless it is set.
    """
    from ray import tune

    spec = _resolve_run(plan)
    # Tune hands this variable on to the trial processes it starts.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    output_dir = Path(output_dir).resolve() if output_dir is not None else None
    train_fn = functools.partial(_train_trial, spec, env, stop, output_dir, name, checkpoint_freq)
    # Trial names begin with the trainable's name: "PPO_1a2b3_00000".
    label = "".join(c if c.isalnum() or c in "-_" else "_" for c in _plan_label(spec))

    def run_trial(config):
        return train_fn(config)

    run_trial.__name__ = run_trial.__qualname__ = label
    return tune.with_resources(run_trial, functools.partial(trial_resources, spec.config_class))


def trial_resources(config_class: type, config: dict[str, Any]):
    """One bundle for the trial itself (the learner, with its `num_gpus`), one per rollout worker,
    laid out over the nodes as `worker_placement_strategy` says (DEFAULT: Tune's PACK)."""
    from ray.tune import PlacementGroupFactory

    defaults = config_class()
    num_workers = int(config.get("num_workers", defaults.num_workers))
    per_worker = float(config.get("num_cpus_per_worker", defaults.num_cpus_per_worker))
    strategy = str(config.get("worker_placement_strategy", defaults.worker_placement_strategy))
    num_gpus = float(config.get("num_gpus", defaults.num_gpus))
    learner = {"CPU": 1.0, "GPU": num_gpus} if num_gpus else {"CPU": 1.0}
    return PlacementGroupFactory([learner] + [{"CPU": per_worker}] * num_workers,
                                 strategy="PACK" if strategy == "DEFAULT" else strategy)


def _train_trial(spec, env, stop, output_dir: Path | None, name, checkpoint_freq, config: dict[str, Any]) -> None:
    from ray import tune

    from flowrl.algorithm import Algorithm
    from flowrl.checkpoints import read_checkpoint

    config = dict(config)
    env = config.pop("env", env)
    exp = make_experiment(spec, env, config, stop, name=name)
    if checkpoint_freq is not None:
        exp.config = dataclasses.replace(exp.config, checkpoint_freq=checkpoint_freq)
    run_dir = None
    if output_dir is not None:
        # A trial started again (PBT's exploit, a pause, a retry) goes on in its own run directory.
        run_dir = output_dir / tune.get_context().get_trial_name()
        run_dir.mkdir(parents=True, exist_ok=True)
    # Inside a trial Ray is running: the ray executor joins it, and its actors go into the
    # trial's placement group (Tune captures child tasks and actors there).
    executor = "ray" if exp.config.num_workers else "local"
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        algo = Algorithm(exp, executor, run_dir=run_dir)
    else:
        with checkpoint.as_directory() as path:  # read in full before the directory goes away
            algo = Algorithm(exp, executor, run_dir=run_dir, checkpoint=read_checkpoint(Path(path)))
    with algo:
        freq = exp.config.checkpoint_freq
        while True:
            result = algo.train()
            reason = stop_reason(exp.stop, result)
            metrics = tune_metrics(result)
            if run_dir is not None:
                metrics["run_dir"] = str(run_dir)
            if reason:
                # Tune ends a trial whose result says done before its scheduler sees the result
                # (a synchronous PBT would otherwise pause it there and start it again).
                metrics["done"] = True
            if not (reason or (freq and result["training_iteration"] % freq == 0)):
                tune.report(metrics)
            elif run_dir is not None:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(algo.save())))
            else:
                scratch = Path(tempfile.mkdtemp(prefix="flowrl-tune-"))
                try:  # Tune copies a reported checkpoint into its storage before report returns
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(algo.save(scratch / "c"))))
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            if reason:
                return


def tune_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A result record as Tune takes it: nested dicts flattened to "a/b", and no None or NaN
    (Tune's schedulers compare every value they are given; a key that is missing they skip)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(tune_metrics({f"{key}/{k}": v for k, v in value.items()}))
        elif value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[key] = value
    return out


# ---- search spaces ----------------------------------------------------------------------------
def tune_domain(domain: dict[str, Any]) -> Any:
    """A plan file's {grid_search: [...]}, {choice: [...]}, {uniform: [a, b]} or {loguniform: [a, b]}
    as Ray Tune's own."""
    from ray import tune

    (kind, args), = domain.items()
    if kind == "grid_search":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    return getattr(tune, kind)(*args)


def param_space(exp: Experiment) -> dict[str, Any]:
    """The experiment's config as given, its search spaces turned into Tune's."""
    space = dict(exp.config_data or {})
    for key, domain in (exp.search_space or {}).items():
        space = set_dotted(space, key, tune_domain(domain))
    return space


def pbt_mutations(exp: Experiment) -> dict[str, Any]:
    """What PBT explores: every key with a search space (a grid or a choice as its list of
    values, a range as itself), nested as the config is."""
    mutations: dict[str, Any] = {}
    for key, domain in (exp.search_space or {}).items():
        (kind, args), = domain.items()
        node = mutations
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(args) if kind in ("grid_search", "choice") else tune_domain(domain)
    return mutations


# ---- sweeps (flowrl tune) ---------------------------------------------------------------------
def make_scheduler(kind: str, exp: Experiment, max_t: int | None = None, grace_period: int = 1,
                   perturbation_interval: int = 4):
    """None (FIFO), ASHA (stops trials that trail at each rung of training iterations) or PBT
    (every `perturbation_interval` iterations, trials in the bottom quantile take over a top
    trial's checkpoint and explore its search-space keys). PBT runs synchronously: with few
    trials, asynchronous PBT often finds no other trial with a result to compare with."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining

    if kind == "fifo":
        return None
    if kind == "asha":
        max_t = max_t or int(exp.stop.get("training_iteration", 100))
        if grace_period > max_t:
            raise ExperimentError(f"--grace-period {grace_period} exceeds --max-t {max_t}")
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period)
    if kind == "pbt":
        if not exp.search_space:
            raise ExperimentError(f"{exp.source}: experiment {exp.name!r}: --scheduler pbt explores the keys of config "
                                  "that have a search space, and this config has none")
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=perturbation_interval,
                                       hyperparam_mutations=pbt_mutations(exp), synch=True, require_attrs=False)
    raise ExperimentError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


def run_sweep(exp: Experiment, output_dir: str | os.PathLike = "runs", num_samples: int = 1, scheduler: str = "fifo",
              metric: str = "episode_return_mean", mode: str = "max", max_concurrent: int | None = None,
              num_cpus: int | None = None, address: str | None = None, quiet: bool = False,
              max_t: int | None = None, grace_period: int = 1, perturbation_interval: int = 4,
              connect_timeout_s: float | None = None) -> dict[str, Any]:
    """Tune the experiment's search space: one flowrl run directory per trial under
    <output_dir>/<experiment>/<time>/<trial>/, Tune's own files under .../<time>/tune/, and
    <output_dir>/<experiment>/latest pointing to the best trial's run. Returns the sweep:
    {"sweep_dir", "tune_dir", "trials": [...], "best": trial or None}; a trial is a dict with
    name, config (its search-space keys), iterations, timesteps_total, the metric, run_dir, error."""
    from ray import tune

    from flowrl.cluster import runtime_env_for
    from flowrl.config import ConfigError
    from flowrl.device import check_ray_gpus
    from flowrl.executors import RayExecutor
    from flowrl.experiment import claim_dir, point_latest

    if mode not in ("max", "min"):
        raise ExperimentError(f"--mode: expected max or min, got {mode!r}")
    for flag, value in (("--num-samples", num_samples), ("--max-concurrent", max_concurrent),
                        ("--perturbation-interval", perturbation_interval), ("--grace-period", grace_period)):
        if value is not None and value < 1:
            raise ExperimentError(f"{flag}: must be >= 1, got {value}")
    sched = make_scheduler(scheduler, exp, max_t, grace_period, perturbation_interval)
    # Joining a cluster, the Ray job ships the user code the experiment names to every node (flowrl.cluster).
    runtime_env = runtime_env_for(exp.env, exp.config, exp.plan_name) if address else None
    ray_executor = RayExecutor(num_cpus=num_cpus, address=address, quiet=quiet, connect_timeout_s=connect_timeout_s,
                               runtime_env=runtime_env)
    ray_executor.start()  # joins a Ray already running in this process, else starts one (or joins address)
    try:
        if exp.config.num_gpus:
            try:
                check_ray_gpus(exp.config.num_gpus)
            except ConfigError as e:
                raise ExperimentConfigError(f"{exp.source}: experiment {exp.name!r}", ConfigError(f"config.{e.key}",
                                                                                                  e.message)) from None
        experiment_dir = Path(output_dir) / exp.name
        sweep_dir = claim_dir(experiment_dir).resolve()
        fn = trainable(exp.plan, exp.env, exp.stop, output_dir=sweep_dir, name=exp.name,
                       checkpoint_freq=perturbation_interval if scheduler == "pbt" else None)
        tuner = tune.Tuner(fn, param_space=param_space(exp),
                           tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples,
                                                       scheduler=sched, max_concurrent_trials=max_concurrent),
                           run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir),
                                                     verbose=0 if quiet else 1))
        # Tune prints a heading whatever its verbosity; --quiet means the table of trials alone.
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext(), \
                warnings.catch_warnings():
            # PBT's advice to implement reset_config is for class trainables.
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
            grid = tuner.fit()
    finally:
        ray_executor.close()
    trials = [_trial_summary(result, exp, metric) for result in grid]
    scored = [t for t in trials if t["metric"] is not None]
    best = (max if mode == "max" else min)(scored, key=lambda t: t["metric"]) if scored else None
    if best is not None and best["run_dir"]:
        point_latest(experiment_dir, str(Path(best["run_dir"]).relative_to(experiment_dir.resolve())))
    return {"sweep_dir": str(sweep_dir), "tune_dir": str(sweep_dir / "tune"), "metric": metric, "mode": mode,
            "trials": trials, "best": best}


def _trial_summary(result, exp: Experiment, metric: str) -> dict[str, Any]:
    metrics = result.metrics or {}
    config = result.config or {}
    searched = {}
    for key in exp.search_space or {}:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        searched[key] = node
    # Tune names a trial's directory <trial name>_<tag>_<date>, the name ending in <run id>_<index>.
    name = re.match(r"^(.*?_[0-9a-f]{5}_[0-9]{5})(_|$)", Path(result.path).name)
    return {"name": Path(metrics["run_dir"]).name if metrics.get("run_dir") else
            name.group(1) if name else Path(result.path).name,
            "config": searched, "iterations": metrics.get("training_iteration"),
            "timesteps_total": metrics.get("timesteps_total"), "metric": result_value(metrics, metric),
            "run_dir": metrics.get("run_dir"),
            "error": str(result.error).strip().splitlines()[-1] if result.error else None}


def format_sweep(sweep: dict[str, Any]) -> str:
    """The trials as a table, then the best one's config and run directory."""
    trials, metric = sweep["trials"], sweep["metric"]
    keys = list(trials[0]["config"]) if trials else []
    header = ["trial", *keys, "iter", "timesteps", metric]
    rows = []
    for t in trials:
        value = t["metric"]
        rows.append([t["name"], *(_short(t["config"][k]) for k in keys), str(t["iterations"] or 0),
                     f"{t['timesteps_total'] or 0:,}",
                     t["error"] and f"error: {t['error']}" or ("n/a" if value is None else f"{value:.2f}")])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    best = sweep["best"]
    if best is None:
        lines.append(f"no trial reported {metric}")
    else:
        config = ", ".join(f"{k}={_short(v)}" for k, v in best["config"].items())
        lines.append(f"best: {best['name']} ({metric} {best['metric']:.2f}{'; ' + config if config else ''}); "
                     f"run dir {shown_path(best['run_dir'])}")
    return "\n".join(lines)


def shown_path(path: str | None) -> str | None:
    """A path inside the working directory as relative to it."""
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["SCHEDULERS", "format_sweep", "make_scheduler", "param_space",
           "pbt_mutations", "run_sweep", "trainable", "trial_resources", "tune_domain", "tune_metrics"]
