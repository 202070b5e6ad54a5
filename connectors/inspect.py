"""`flowrl dataset inspect`: what a dataset holds, without loading it whole.

>>> import tempfile, numpy as np
>>> from flowrl.connectors import Dataset, DatasetWriter
>>> from flowrl.sample_batch import SampleBatch
>>> path = tempfile.mkdtemp()
>>> with DatasetWriter(path) as w:
...     w.write(SampleBatch({"eps_id": np.array([1, 1, 2]), "rewards": np.array([1.0, 2.0, 5.0], np.float32),
...                          "terminateds": np.array([False, True, False]), "truncateds": np.zeros(3, bool)}))
>>> info = inspect_dataset(Dataset.open(path))
>>> info["rows"], info["episodes"]["total"], info["episodes"]["complete"], info["episodes"]["return_mean"]
(3, 2, 1, 3.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowrl.connectors.input import Dataset
from flowrl.connectors.multi_agent import open_policy, policy_ids
from flowrl.connectors.reader import episode_breaks


def inspect_dataset(dataset: Dataset) -> dict[str, Any]:
    """Schema, spaces, files, rows; and, when the columns allow, episodes with the return and
    length statistics of those that end in the dataset (terminated or truncated), and the
    number of ids that several episodes share (which training refuses)."""
    columns = {}
    for field in dataset.schema:
        shape = dataset.column_shape(field.name)
        t = field.type
        dtype = str(t.value_type) if hasattr(t, "value_type") and shape else str(t)
        columns[field.name] = {"type": dtype, "shape": list(shape)}
    info: dict[str, Any] = {
        "path": dataset.where, "format": dataset.format, "files": len(dataset.files),
        "chunks": len(dataset.chunks), "rows": 0, "columns": columns,
        "spaces": {k: str(v) for k, v in dataset.spaces.items()},
    }
    if "agent_id" in dataset.columns:  # a policy of a multi-agent recording: rows per agent
        counts: dict[str, int] = {}
        for chunk in dataset.chunks:
            for item in dataset.read(chunk, ["agent_id"]).column("agent_id").value_counts().to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        info["agents"] = dict(sorted(counts.items()))
    numeric = [c for c in dataset.columns if c not in ("agent_id", "policy_id")]
    wanted = [c for c in ("eps_id", "t", "rewards", "terminateds", "truncateds") if c in dataset.columns]
    parts = list(dataset.scan(wanted or [numeric[0]]))
    info["rows"] = int(sum(len(next(iter(p.values()))) for p in parts))
    if "eps_id" not in wanted:
        return info
    cols = {k: np.concatenate([p[k] for p in parts]) for k in wanted}
    ids, episode = np.unique(cols["eps_id"], return_inverse=True)
    episodes: dict[str, Any] = {"total": len(ids)}
    lengths = np.bincount(episode, minlength=len(ids))
    ended = np.zeros(len(ids), dtype=bool)
    for flag in ("terminateds", "truncateds"):
        if flag in cols:
            ended[episode[cols[flag]]] = True
    episodes["complete"] = int(ended.sum())
    if "t" in cols:
        order = np.lexsort((cols["t"], cols["eps_id"]))
        flags = [cols[k][order] for k in ("terminateds", "truncateds") if k in cols]
        repeated, _, after_end = episode_breaks(cols["eps_id"][order], cols["t"][order],
                                                np.logical_or.reduce(flags) if flags else None)
        episodes["shared_ids"] = len(np.unique(cols["eps_id"][order][1:][repeated | after_end]))
    if "rewards" in cols and ended.any():
        returns = np.bincount(episode, cols["rewards"].astype(np.float64), minlength=len(ids))[ended]
        episodes.update(return_mean=float(returns.mean()), return_std=float(returns.std()),
                        return_min=float(returns.min()), return_max=float(returns.max()),
                        length_mean=float(lengths[ended].mean()))
    info["episodes"] = episodes
    return info


def inspect_path(path: str) -> dict[str, Any]:
    """`inspect_dataset` of the dataset at `path`; of a multi-agent recording (connectors.multi_agent),
    its total rows and, under `policies`, that of each policy's dataset."""
    policies = policy_ids(path)
    if policies is None:
        return inspect_dataset(Dataset.open(path))
    infos = {pid: inspect_dataset(open_policy(path, pid)) for pid in policies}  # episodes: agent trajectories
    return {"path": path, "format": "multi-agent", "rows": sum(i["rows"] for i in infos.values()),
            "policies": infos}


def format_info(info: dict[str, Any]) -> str:
    if "policies" in info:
        n = len(info["policies"])
        lines = [f"{info['path']}: multi-agent, {n} polic{'y' if n == 1 else 'ies'}, {info['rows']:,} rows "
                 "(episodes: each agent's trajectory)"]
        for pid, policy in info["policies"].items():
            lines.append(f"policy {pid}: {policy['rows']:,} rows")
            lines.extend("  " + line for line in format_info(policy).splitlines())
        return "\n".join(lines)
    lines = [f"{info['path']}: {info['format']}, {info['files']} file(s), {info['chunks']} chunk(s), "
             f"{info['rows']:,} rows"]
    lines.append("columns:")
    for name, c in info["columns"].items():
        shape = f"[{', '.join(map(str, c['shape']))}]" if c["shape"] else "scalar"
        lines.append(f"  {name:<14} {c['type']:<10} {shape}")
    if info["spaces"]:
        lines.append("spaces:")
        for name, s in info["spaces"].items():
            lines.append(f"  {name:<14} {s}")
    if info.get("agents"):
        lines.append("agents: " + ", ".join(f"{a} {n:,} rows" for a, n in info["agents"].items()))
    episodes = info.get("episodes")
    if episodes:
        text = f"episodes: {episodes['total']:,} ({episodes['complete']:,} complete)"
        if "return_mean" in episodes:
            text += (f"; return mean {episodes['return_mean']:.2f} (std {episodes['return_std']:.2f}, "
                     f"min {episodes['return_min']:.2f}, max {episodes['return_max']:.2f}); "
                     f"length mean {episodes['length_mean']:.1f}")
        if episodes.get("shared_ids"):
            text += (f"\n  {episodes['shared_ids']:,} eps_id(s) shared by several episodes (recordings whose ids "
                     "both start at 0?): training from this dataset refuses them")
        lines.append(text)
    return "\n".join(lines)
