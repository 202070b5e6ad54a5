"""The `flowrl` command line: run, eval, plans, plot, dataset inspect.

Bad input (a plan file, an override, a run directory, a checkpoint) prints one line naming the
file and key to stderr and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import flowrl

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2 (its default code too)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowrl", description="Reinforcement learning as a dataflow program over Arrow SampleBatches.")
    parser.add_argument("--version", action="version", version=f"flowrl {flowrl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="train the experiments of a YAML plan file")
    run.add_argument("plan_file", metavar="PLAN.yaml")
    run.add_argument("--output-dir", default="runs", help="where run directories go (default: runs)")
    run.add_argument("--seed", type=int, help="overrides config.seed")
    run.add_argument("--executor", choices=["local", "ray"], default="local")
    run.add_argument("--address", help="an existing Ray cluster to join (implies --executor ray)")
    run.add_argument("--num-workers", type=int, help="overrides config.num_workers")
    run.add_argument("--num-cpus", type=int, help="CPUs for a Ray instance started here (default: all)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of every experiment, e.g. config.lr=0.001 or stop.timesteps_total=50000")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress line, only the summary")

    ev = sub.add_parser("eval", help="run the greedy policy of a run or checkpoint")
    ev.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON object")

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
                       Path(args.resume) if args.resume else None, num_cpus=args.num_cpus)
    return 0


def _eval(args) -> int:
    from flowrl.experiment import load_policy

    if args.episodes < 1:
        print("flowrl: error: --episodes must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    policy = load_policy(args.path)
    returns = policy.evaluate(args.episodes, seed=args.seed)
    mean = sum(returns) / len(returns)
    if args.json:
        print(json.dumps({"episode_return_mean": mean, "episodes": len(returns), "episode_returns": returns}))
    else:
        print(f"{args.path}: {len(returns)} greedy episodes on {policy.env}: episode_return_mean {mean:.2f} "
              f"(min {min(returns):.2f}, max {max(returns):.2f})")
    return 0


def _plans(args) -> int:
    from flowrl.experiment import plan_defaults

    for name, defaults in plan_defaults().items():
        print(f"{name}:")
        for key, value in defaults.items():
            print(f"  {key}: {json.dumps(value)}")
    return 0


def _dataset(args) -> int:
    from flowrl.connectors import Dataset
    from flowrl.connectors.inspect import format_info, inspect_dataset

    info = inspect_dataset(Dataset.open(args.path))
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def _plot(args) -> int:
    from flowrl.experiment import ExperimentError

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir in args.run_dirs:
        path = Path(run_dir) / "metrics.jsonl"
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            raise ExperimentError(f"{path}: missing; is {run_dir} a flowrl run directory?") from None
        except json.JSONDecodeError as e:
            raise ExperimentError(f"{path}: line {e.lineno}: not JSON") from None
        points = [(r["timesteps_total"], r["episode_return_mean"]) for r in rows
                  if r.get("episode_return_mean") is not None and "timesteps_total" in r]
        if points:
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


def main(argv: list[str] | None = None) -> int:
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
    # User plans, envs and models named "package.module:name" import from the working
    # directory, as they would under `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    commands = {"run": _run, "eval": _eval, "plans": _plans, "plot": _plot, "dataset": _dataset}
    try:
        return commands[args.command](args)
    except (ExperimentError, ConfigError, EnvError, DatasetError) as e:
        print(f"flowrl: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("flowrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
