"""The `flowrl` command line: run, train, tune, eval, serve, plans, plot, dataset inspect.

Bad input (a plan file, an override, a run directory, a checkpoint) prints one line naming the
file and key to stderr and exits with code 2; no traceback. So does a request that cannot be met
(a cluster that cannot be joined, workers that cannot be placed or built). A fault while running
(an env that raises, actors that keep dying) prints one line and exits with code 1, after writing
a checkpoint that `--resume` continues from.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import flowrl
from flowrl.planfile import FlowrlWarning

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def _show_warning(show_other, message, category, filename, lineno, file=None, line=None):
    """flowrl's own warnings as one line; any other as before."""
    if issubclass(category, FlowrlWarning):
        print(f"flowrl: warning: {message}", file=sys.stderr)
    else:
        show_other(message, category, filename, lineno, file, line)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2 (its default code too)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowrl", description="Reinforcement learning as a dataflow program over Arrow SampleBatches.")
    parser.add_argument("--version", action="version", version=f"flowrl {flowrl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="train the experiments of a YAML plan file")
    run.add_argument("plan_file", metavar="PLAN.yaml")
    _add_run_flags(run)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of every experiment, e.g. config.lr=0.001 or stop.timesteps_total=50000")

    train = sub.add_parser("train", help="train one plan on one env given on the command line (no plan file)")
    train.add_argument("--run", required=True, metavar="PLAN", help="a plan: PPO, DQN, ... or package.module:function")
    train.add_argument("--env", metavar="ENV", help="a gymnasium id such as CartPole-v1, or module:Class")
    train.add_argument("--config", default="{}", metavar="JSON_OR_YAML",
                       help="the config mapping, e.g. '{\"lr\": 0.001}'")
    train.add_argument("--stop", metavar="JSON_OR_YAML",
                       help="stop conditions, e.g. '{\"timesteps_total\": 100000}' (default: run until Ctrl-C)")
    train.add_argument("--name", help="the experiment's name in --output-dir (default: <env>-<plan>, lower case)")
    _add_run_flags(train)

    tune = sub.add_parser("tune", help="tune the search spaces of a plan file's config with Ray Tune")
    tune.add_argument("plan_file", metavar="PLAN.yaml")
    tune.add_argument("--num-samples", type=int, default=1, help="trials per grid point (default: 1)")
    tune.add_argument("--scheduler", choices=["fifo", "asha", "pbt"], default="fifo")
    tune.add_argument("--metric", default="episode_return_mean", help="what the scheduler and the best trial go by")
    tune.add_argument("--mode", choices=["max", "min"], default="max")
    tune.add_argument("--max-concurrent", type=int, help="trials running at once (default: as many as fit)")
    tune.add_argument("--max-t", type=int, help="asha: iterations at most (default: stop.training_iteration or 100)")
    tune.add_argument("--grace-period", type=int, default=1, help="asha: iterations before a trial may be stopped")
    tune.add_argument("--perturbation-interval", type=int, default=4,
                      help="pbt: iterations between exploit/explore steps (and checkpoints)")
    tune.add_argument("--output-dir", default="runs", help="where run directories go (default: runs)")
    tune.add_argument("--seed", type=int, help="overrides config.seed")
    tune.add_argument("--num-workers", type=int, help="overrides config.num_workers")
    tune.add_argument("--num-cpus", type=int, help="CPUs for a Ray instance started here (default: all)")
    tune.add_argument("--address", help="an existing Ray cluster to join")
    tune.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                      help="give up joining --address after this long (default: $FLOWRL_CONNECT_TIMEOUT_S or 30)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of every experiment, e.g. config.lr={grid_search: [0.001, 0.0003]}")
    tune.add_argument("--quiet", action="store_true", help="no Tune status, only the table of trials")

    ev = sub.add_parser("eval", help="run the greedy policy of a run or checkpoint")
    ev.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--policy", help="multi-agent runs: the policy whose agents' returns to report (all act)")

    sv = sub.add_parser("serve", help="serve the policy of a run or checkpoint over HTTP (POST /act)")
    sv.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need "
                                                        "--token-file)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    sv.add_argument("--token-file", help="file holding the bearer token (default: a new one in RUN_DIR/serve_token)")
    sv.add_argument("--explore", action="store_true", help="sample actions instead of taking the greedy ones")

    sub.add_parser("plans", help="list the built-in plans with their defaults")

    dataset = sub.add_parser("dataset", help="offline datasets")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", parser_class=_Parser,
                                         required=True)
    inspect = dataset_sub.add_parser("inspect", help="schema, spaces, rows, episodes and return statistics")
    inspect.add_argument("path", metavar="PATH", help="a file, directory, glob, or minari:DATASET_ID")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    plot = sub.add_parser("plot", help="write a PNG learning curve (return vs env steps)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--output", "-o", default="learning_curve.png")
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `flowrl run` and `flowrl train` share."""
    parser.add_argument("--output-dir", default="runs", help="where run directories go (default: runs)")
    parser.add_argument("--seed", type=int, help="overrides config.seed")
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--address", help="an existing Ray cluster to join (implies --executor ray)")
    parser.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                        help="give up joining --address after this long (default: $FLOWRL_CONNECT_TIMEOUT_S or 30)")
    parser.add_argument("--num-workers", type=int, help="overrides config.num_workers")
    parser.add_argument("--num-cpus", type=int, help="CPUs for a Ray instance started here (default: all)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress line, only the summary")


def _mapping_arg(flag: str, text: str | None) -> dict | None:
    """--config and --stop: a JSON or YAML mapping (JSON is YAML)."""
    import yaml

    from flowrl.planfile import ExperimentError, load_yaml

    if text is None:
        return None
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        raise ExperimentError(f"{flag}: not valid JSON or YAML: {getattr(e, 'problem', None) or e}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        example = '{"lr": 0.001}' if flag == "--config" else '{"timesteps_total": 100000}'
        raise ExperimentError(f"{flag}: expected a mapping such as '{example}', got {text!r}")
    return value


def _train(args) -> int:
    from flowrl.experiment import make_experiment, run_experiment

    config = _mapping_arg("--config", args.config)
    for key, value in (("seed", args.seed), ("num_workers", args.num_workers)):
        if value is not None:
            config[key] = value
    exp = make_experiment(args.run, args.env, config, _mapping_arg("--stop", args.stop), name=args.name)
    run_experiment(exp, Path(args.output_dir), "ray" if args.address else args.executor, args.address, args.quiet,
                   Path(args.resume) if args.resume else None, num_cpus=args.num_cpus,
                   connect_timeout_s=args.connect_timeout)
    return 0


def _tune(args) -> int:
    from flowrl.experiment import load_experiments
    from flowrl.planfile import parse_overrides
    from flowrl.tune import format_sweep, run_sweep, shown_path

    experiments = load_experiments(args.plan_file, parse_overrides(args.overrides), seed=args.seed,
                                   num_workers=args.num_workers, search_spaces=True)
    failed = 0
    for exp in experiments:
        sweep = run_sweep(exp, args.output_dir, args.num_samples, args.scheduler, args.metric, args.mode,
                          args.max_concurrent, args.num_cpus, args.address, args.quiet, args.max_t, args.grace_period,
                          args.perturbation_interval, args.connect_timeout)
        print(f"{exp.name}: {len(sweep['trials'])} trials in {shown_path(sweep['sweep_dir'])}")
        print(format_sweep(sweep))
        failed += all(t["error"] for t in sweep["trials"])
    if failed:
        print(f"flowrl: error: every trial of {failed} experiment{'s' if failed > 1 else ''} failed (see the table)",
              file=sys.stderr)
        return 1
    return 0


def _run(args) -> int:
    from flowrl.experiment import load_experiments, parse_overrides, run_experiment

    executor = "ray" if args.address else args.executor
    experiments = load_experiments(args.plan_file, parse_overrides(args.overrides), seed=args.seed,
                                   num_workers=args.num_workers)
    if args.resume and len(experiments) != 1:
        print(f"flowrl: error: --resume needs a plan file with one experiment; {args.plan_file} has "
              f"{len(experiments)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for exp in experiments:
        run_experiment(exp, Path(args.output_dir), executor, args.address, args.quiet,
                       Path(args.resume) if args.resume else None, num_cpus=args.num_cpus,
                       connect_timeout_s=args.connect_timeout)
    return 0


def _eval(args) -> int:
    from flowrl.experiment import load_policy

    if args.episodes < 1:
        print("flowrl: error: --episodes must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    policy = load_policy(args.path, policy=args.policy)
    returns = policy.evaluate(args.episodes, seed=args.seed)
    mean = sum(returns) / len(returns)
    if args.json:
        print(json.dumps({"episode_return_mean": mean, "episodes": len(returns), "episode_returns": returns,
                          "checkpoint": str(policy.checkpoint)}))
    else:
        what = "greedy episodes" if policy.policy_id is None else \
            f"agent episodes of policy {policy.policy_id!r} ({args.episodes} greedy team episodes)"
        print(f"{policy.checkpoint}: {len(returns)} {what} on {policy.env}: episode_return_mean {mean:.2f} "
              f"(min {min(returns):.2f}, max {max(returns):.2f})")
    return 0


def _serve(args) -> int:
    from flowrl.serve import serve_forever

    return serve_forever(args.path, args.host, args.port, args.token_file, args.explore)


def _plans(args) -> int:
    from flowrl.experiment import plan_defaults

    for name, defaults in plan_defaults().items():
        print(f"{name}:")
        for key, value in defaults.items():
            print(f"  {key}: {json.dumps(value)}")
    return 0


def _dataset(args) -> int:
    from flowrl.connectors.inspect import format_info, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def _plot(args) -> int:
    import warnings

    from flowrl.experiment import ExperimentError, FlowrlWarning, resolve_run_path
    from flowrl.metrics_files import read_metrics

    curves, empty = [], []
    for arg in args.run_dirs:
        path = resolve_run_path(arg) / "metrics.jsonl"
        rows = read_metrics(path)
        points = [(r["timesteps_total"], r["episode_return_mean"]) for r in rows
                  if r.get("episode_return_mean") is not None and "timesteps_total" in r]
        if points:
            curves.append((arg, points))
        else:
            empty.append(f"{path}: {'no episode_return_mean yet' if rows else 'no rows yet'}")
    if not curves:
        raise ExperimentError(f"no data to plot: {'; '.join(empty)}")
    for reason in empty:
        warnings.warn(f"{reason}; left out of the plot", FlowrlWarning)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir, points in curves:
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=str(Path(run_dir).resolve().relative_to(Path.cwd()) if
                                  Path(run_dir).resolve().is_relative_to(Path.cwd()) else run_dir))
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return (mean of last 100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _PlainText:
    """A text stream that drops ANSI escape sequences on their way to a file or a pipe: Ray
    colours some of its messages (a remote error's "ray::Actor.method()" always), and a
    flowrl message may quote them."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(_ANSI_ESCAPE.sub("", text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    saved = sys.stdout, sys.stderr
    if not _is_terminal(sys.stdout) and not isinstance(sys.stdout, _PlainText):
        sys.stdout = _PlainText(sys.stdout)
    if not _is_terminal(sys.stderr) and not isinstance(sys.stderr, _PlainText):
        sys.stderr = _PlainText(sys.stderr)
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as tools killed by SIGPIPE do.
        # stdout goes to devnull so that flushing it at exit does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # stdout is not a file descriptor (captured in tests)
        code = EXIT_BROKEN_PIPE
    # Not restored when an unexpected error escapes: its traceback goes out plain too.
    sys.stdout, sys.stderr = saved
    return code


def _main(argv: list[str] | None) -> int:
    from flowrl.config import ConfigError
    from flowrl.connectors import DatasetError
    from flowrl.envs import EnvError
    from flowrl.experiment import ExperimentError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not (_is_terminal(sys.stdout) and _is_terminal(sys.stderr)):
        # Ray colours the "(RolloutWorker pid=...)" prefix of worker output unless told not to;
        # in a log file or a pipe those codes are noise.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # User plans, envs and models named "package.module:name" import from the working
    # directory, as they would under `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    commands = {"run": _run, "train": _train, "tune": _tune, "eval": _eval, "serve": _serve, "plans": _plans,
                "plot": _plot, "dataset": _dataset}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", FlowrlWarning)
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return commands[args.command](args)
    except (ExperimentError, ConfigError, EnvError, DatasetError) as e:
        print(f"flowrl: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        from flowrl.executors import find_run_error

        fault = find_run_error(e)  # env faults, actors that cannot start or be placed, cluster joins
        if fault is None:
            raise
        saved = getattr(fault, "checkpoint", None)
        resume = f"; checkpoint saved in {saved} (--resume {saved.parent.parent} continues)" if saved else ""
        print(f"flowrl: error: {fault}{resume}", file=sys.stderr)
        return fault.exit_code
    except KeyboardInterrupt:
        print("flowrl: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `flowrl` command: main(), then exit. After a `ray.init` given up on (a cluster that
    never answered: its thread abandoned after --connect-timeout or Ctrl-C), the interpreter's
    finalization can crash inside Ray's C++ client (std::bad_alloc, exit -6; or a segfault, -11,
    once the thread has ended), so then the process leaves at once, after flushing what it printed."""
    from flowrl.executors import abandoned_joins

    code = main()
    if abandoned_joins or any(t.name == "ray-join" and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
