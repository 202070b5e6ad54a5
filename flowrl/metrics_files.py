"""What a run writes each iteration: metrics.jsonl, progress.csv, TensorBoard events."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, TextIO

import numpy as np


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
