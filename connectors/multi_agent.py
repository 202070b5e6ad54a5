"""Multi-agent datasets: what `output:` records from a multi-agent run, and how it is read back.

A multi-agent recording is a directory holding one ordinary dataset per policy, in a
subdirectory named after the policy id, and a manifest, `_multiagent.json`, listing the
policy ids (JSON; data readers skip names that start with "_"):

    out/_multiagent.json        {"format": "flowrl.multiagent", "policies": ["pursuer", "evader"]}
    out/pursuer/part-*.parquet  the pursuer policy's rows
    out/evader/part-*.parquet

Each policy's files carry its own spaces in their schema metadata (policies may have
different observation and action spaces), plus two string columns, `agent_id` (the agent
whose step the row is) and `policy_id`. eps_id and t are as the rollout worker gave them: t
counts the agent's own steps in episode eps_id. With equal spaces, plain
`pyarrow.parquet.read_table("out")` reads every policy's rows at once. Offline plans train one
single-agent policy from one policy id's rows (`input_policy_id`), or, run with `multiagent`,
each policy to train from its own rows (`open_policies`, `MultiAgentDatasetInput`).

>>> import tempfile, numpy as np
>>> from flowrl.multi_agent_batch import MultiAgentBatch
>>> from flowrl.sample_batch import SampleBatch
>>> out = tempfile.mkdtemp()
>>> rows = lambda n: SampleBatch({"rewards": np.ones(n, np.float32), "agent_id": np.zeros(n, np.int64)})
>>> with MultiAgentDatasetWriter(out, agent_names=["red_0"]) as w:
...     w.write(MultiAgentBatch({"red": rows(3), "blue": rows(2)}, env_steps=3))
>>> policy_ids(out), Dataset.open(f"{out}/blue").num_rows
(['red', 'blue'], 2)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowrl.config import ConfigError
from flowrl.connectors.input import Dataset, DatasetError
from flowrl.connectors.output import DatasetWriter
from flowrl.connectors.reader import DatasetInput
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.stream import Stream

MANIFEST = "_multiagent.json"
FORMAT = "flowrl.multiagent"
_SAFE_ID = re.compile(r"[A-Za-z0-9_.\-]+")


class MultiAgentDatasetWriter:
    """A DatasetWriter per policy, made when the policy's first rows come. `agent_names` turns
    the batches' `agent_id` indexes into names (the worker's agent list; it may grow while the
    run goes). Other keyword arguments go to each DatasetWriter."""

    def __init__(self, path: str | os.PathLike, agent_names: list[str] | None = None, **writer_kwargs: Any):
        self.path = Path(path)
        self.agent_names = agent_names if agent_names is not None else []
        self.writer_kwargs = writer_kwargs
        self.writers: dict[str, DatasetWriter] = {}
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, batch) -> None:
        """One MultiAgentBatch: each policy's rows, with agent_id and policy_id as strings."""
        for pid, rows in batch.policy_batches.items():
            if len(rows):
                self._writer(pid).write(rows, extra=self._string_columns(pid, rows))

    def _string_columns(self, pid: str, rows) -> dict[str, pa.Array]:
        names = self.agent_names
        index = rows["agent_id"]
        if len(index) and int(index.max()) >= len(names):
            raise ValueError(f"agent index {int(index.max())} of policy {pid!r} is not among the worker's "
                             f"{len(names)} agents")
        agent_ids = pa.array(names, pa.string()).take(pa.array(index))
        return {"agent_id": agent_ids, "policy_id": pa.array([pid] * len(rows), pa.string())}

    def _writer(self, pid: str) -> DatasetWriter:
        writer = self.writers.get(pid)
        if writer is None:
            if not _SAFE_ID.fullmatch(pid) or pid.startswith((".", "_")):
                raise ValueError(f"policy id {pid!r} cannot name a dataset directory (letters, digits, _ . -)")
            writer = self.writers[pid] = DatasetWriter(self.path / pid, **self.writer_kwargs)
            self._write_manifest()
        return writer

    def _write_manifest(self) -> None:
        """The policy ids so far, replaced atomically (a policy may be added while the run goes)."""
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT, "policies": list(self.writers)}))
        os.replace(tmp, self.path / MANIFEST)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def __enter__(self) -> "MultiAgentDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def policy_ids(spec: Any) -> list[str] | None:
    """The policy ids of a multi-agent recording at `spec` (a local directory with a manifest);
    None for anything else."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    manifest = Path(spec) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{manifest}: not a readable manifest: {e}") from None
    policies = data.get("policies") if isinstance(data, dict) else None
    if data.get("format") != FORMAT or not isinstance(policies, list) or \
            not all(isinstance(p, str) and _SAFE_ID.fullmatch(p) for p in policies):
        raise DatasetError(f"{manifest}: expected {{\"format\": \"{FORMAT}\", \"policies\": [names]}}")
    return policies


def open_policy(spec: Any, policy_id: str | None, key: str = "input_policy_id") -> Dataset:
    """The dataset of one policy of a multi-agent recording, or `spec` itself when it is not
    one (then `policy_id` must be None). Errors name `key`, the setting that chooses the policy."""
    policies = policy_ids(spec)
    if policies is None:
        if policy_id is not None:
            raise ConfigError(key, f"{policy_id!r} given, but the input is not a multi-agent dataset (no {MANIFEST})")
        return Dataset.open(spec)
    if policy_id is None:
        raise ConfigError(key, f"missing: {os.fspath(spec)} is a multi-agent dataset; choose the policy to train "
                               f"from: {', '.join(policies)}")
    if policy_id not in policies:
        raise ConfigError(key, f"{policy_id!r} is not a policy of {os.fspath(spec)} (it has: {', '.join(policies)})")
    data = Dataset.open(Path(spec) / policy_id)
    return AgentTrajectories(data) if "eps_id" in data.columns and "agent_id" in data.columns else data


def open_policies(spec: Any, policies: list[str], to_train: list[str]) -> dict[str, Dataset]:
    """The dataset of each policy in `to_train`, from the multi-agent recording at `spec`, for a
    run whose config.multiagent names `policies`. A policy id of the recording that the config
    does not name, and a policy to train without rows, are each a one-line error."""
    recorded = policy_ids(spec)
    if recorded is None:
        raise ConfigError("input", f"{os.fspath(spec)} is not a multi-agent dataset (no {MANIFEST}); with "
                                   "multiagent, record one with output: and the same multiagent section")
    for pid in recorded:
        if pid not in policies:
            raise DatasetError(f"{os.fspath(spec)}: column 'policy_id': {pid!r} is not a policy of config.multiagent "
                               f"(its policies: {', '.join(policies)})")
    for pid in to_train:
        if pid not in recorded:
            raise DatasetError(f"{os.fspath(spec)}: column 'policy_id': no rows of {pid!r}, a policy to train (the "
                               f"dataset has: {', '.join(recorded)})")
    return {pid: open_policy(spec, pid) for pid in to_train}


class MultiAgentDatasetInput(DatasetInput):
    """MultiAgentBatches of `batch_size` rows of each policy of `datasets` ({policy id: its
    rows}), each policy's rows shuffled and repeated as DatasetInput's (seed + i for the i-th);
    it ends when the first policy's rows run out. Rows read count as `num_agent_steps_sampled`
    and `num_rows_read`; a batch's env steps are its largest policy batch (shuffled rows cover
    no known env steps), counted as `num_env_steps_sampled`."""

    def __init__(self, datasets: dict[str, Dataset], columns: list[str], batch_size: int,
                 shuffle_buffer_size: int = 50_000, seed: int | None = None, num_epochs: int | None = None,
                 count_steps_by: str = "env_steps", name: str = "DatasetInput"):
        Stream.__init__(self, name)
        self.inputs = {pid: DatasetInput(data, columns, batch_size, shuffle_buffer_size,
                                         None if seed is None else seed + i, num_epochs)
                       for i, (pid, data) in enumerate(datasets.items())}
        self.count_steps_by = count_steps_by

    def _batches(self, executor):
        parts = {pid: source._batches(executor) for pid, source in self.inputs.items()}
        try:
            while True:
                try:
                    batches = {pid: next(it) for pid, it in parts.items()}
                except StopIteration:
                    return
                yield MultiAgentBatch(batches, max(len(b) for b in batches.values()),
                                      count_steps_by=self.count_steps_by)
        finally:
            for it in parts.values():
                it.close()

    @staticmethod
    def _count(counters, batch: MultiAgentBatch) -> None:
        counters["num_env_steps_sampled"] += batch.env_steps
        counters["num_agent_steps_sampled"] += batch.agent_steps
        counters["num_rows_read"] += batch.agent_steps


class AgentTrajectories(Dataset):
    """One policy's rows where several agents may share it (parameter sharing): their steps in an
    episode share the eps_id, and t counts each agent's own steps. Reading `eps_id` gives a
    trajectory id per (eps_id, agent_id) instead, so that what reads episodes by eps_id (MARWIL's
    returns-to-go, off-policy estimates, inspect) sees each agent's trajectory as an episode.
    Ids are dense, 0, 1, ..., in (agent, eps_id) order; read locally (not through Ray Data), as
    the ids are made here."""

    ray_readable = False

    def __init__(self, data: Dataset):
        super().__init__(data.source, data.format, data.where)
        pairs = [self._pairs(chunk) for chunk in self.chunks]
        self.agents = sorted({a for _, agents in pairs for a in agents.to_pylist()})
        eps = np.concatenate([e for e, _ in pairs])
        index = np.concatenate([self._agent_index(agents) for _, agents in pairs])
        self._episodes = [np.unique(eps[index == i]) for i in range(len(self.agents))]  # per agent, sorted
        self._offsets = np.cumsum([0] + [len(e) for e in self._episodes])

    def _pairs(self, chunk) -> tuple[np.ndarray, pa.Array]:
        table = self.read(chunk, ["eps_id", "agent_id"])
        return table.column("eps_id").to_numpy(), table.column("agent_id").combine_chunks()

    def _agent_index(self, agents: pa.Array) -> np.ndarray:
        return pc.index_in(agents, value_set=pa.array(self.agents, pa.string())).to_numpy(zero_copy_only=False)

    def trajectory_ids(self, eps_id: np.ndarray, agent_index: np.ndarray) -> np.ndarray:
        out = np.empty(len(eps_id), np.int64)
        for i, episodes in enumerate(self._episodes):
            rows = agent_index == i
            out[rows] = self._offsets[i] + np.searchsorted(episodes, eps_id[rows])
        return out

    def _read_numpy(self, chunk, columns: list[str] | None) -> dict[str, np.ndarray]:
        if columns is None or "eps_id" not in columns:
            return super()._read_numpy(chunk, columns)
        cols = super()._read_numpy(chunk, columns)
        _, agents = self._pairs(chunk)
        cols["eps_id"] = self.trajectory_ids(cols["eps_id"], self._agent_index(agents))
        return cols
