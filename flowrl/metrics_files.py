"""What a run writes each iteration: metrics.jsonl, progress.csv, TensorBoard events.

progress.csv holds every key any row has had: when a row brings a new key (an evaluation's
first result, say), the column is added and the file rewritten with the earlier rows left
blank there, so each value stays under its own name, on resume too."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from flowrl.planfile import ExperimentError, FlowrlWarning


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line cut short (a run still writing it) is left out with
    a warning; a bad line anywhere else raises ExperimentError naming its line in the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing; is {path.parent} a flowrl run directory?") from None
    lines = text.split("\n")  # after a final newline the last item is "", skipped below
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it yet: the writer is still at it
                warnings.warn(f"{path}: line {number}: incomplete (a run still writing it?); left out",
                              FlowrlWarning, stacklevel=2)
                break
            raise ExperimentError(f"{path}: line {number}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ExperimentError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), [])
    except FileNotFoundError:
        return []


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
        self.columns: list[str] = _csv_header(self.csv_path)  # a resumed run goes on with its columns
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
        known = set(self.columns)
        if any(key not in known for key in row):
            self.columns += [key for key in row if key not in known]
            self._rewrite_csv()
        if self.csv is None:
            self.csv_file = open(self.csv_path, "a", newline="")
            self.csv = csv.DictWriter(self.csv_file, fieldnames=self.columns, restval="")
        self.csv.writerow(row)
        self.csv_file.flush()
        step = int(result.get("timesteps_total") or result.get("training_iteration", 0))
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)

    def _rewrite_csv(self) -> None:
        """progress.csv again with the current columns: the earlier rows, realigned, under a new header."""
        if self.csv_file is not None:
            self.csv_file.close()
            self.csv_file, self.csv = None, None
        rows = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)  # a reader sees the old file or the new one, never half of it

    def close(self, flush_tensorboard: bool = True) -> None:
        self.jsonl.close()
        if self.csv_file is not None:
            self.csv_file.close()
        if flush_tensorboard:
            self.tb.close()
