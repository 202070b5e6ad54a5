"""The `flowrl` command line."""

from __future__ import annotations

import argparse
import sys

import flowrl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowrl",
        description="Reinforcement learning as a dataflow program over Arrow SampleBatches.")
    parser.add_argument("--version", action="version", version=f"flowrl {flowrl.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
