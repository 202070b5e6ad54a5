"""Output connector: writes sampled experience as a Parquet (or Arrow IPC) dataset.

Columns use RLlib's new-stack names; tensor columns stay Arrow fixed-shape tensors and the
spaces travel in the schema metadata (msgpack), so plain pyarrow or Ray Data can read the files
without flowrl. Each file is written under a hidden temporary name and renamed when complete:
a crash never leaves a half-written file in the dataset.

>>> import tempfile, numpy as np, pyarrow.parquet as pq
>>> from flowrl.sample_batch import SampleBatch
>>> out = tempfile.mkdtemp()
>>> with DatasetWriter(out, max_rows_per_file=4) as writer:
...     writer.write(SampleBatch({"obs": np.zeros((6, 2), np.float32), "rewards": np.ones(6, np.float32)}))
>>> sorted(pq.read_table(out).column_names), pq.read_table(out).num_rows
(['obs', 'rewards'], 6)
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flowrl.config import OUTPUT_COMPRESSIONS
from flowrl.sample_batch import SUMMARY_KEYS, SampleBatch

# RLlib's new-stack column names; other columns (vf_preds, weights_version, ...) stay in memory.
OUTPUT_COLUMNS = ("eps_id", "obs", "actions", "rewards", "new_obs", "terminateds", "truncateds", "action_logp", "t")
FORMATS = {"parquet": ".parquet", "arrow": ".arrow"}
_file_counter = itertools.count()


def portable_record_batch(rb: pa.RecordBatch) -> pa.RecordBatch:
    """`rb` with bool8 columns as plain Arrow booleans (every reader knows them) and without
    the per-batch summary metadata (episodes, env faults)."""
    arrays, fields = [], []
    for field, column in zip(rb.schema, rb.columns):
        if isinstance(field.type, pa.Bool8Type):
            column = column.storage.cast(pa.bool_())
            field = pa.field(field.name, pa.bool_(), nullable=False, metadata=field.metadata)
        arrays.append(column)
        fields.append(field)
    metadata = {k: v for k, v in (rb.schema.metadata or {}).items() if k not in SUMMARY_KEYS}
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata))


class DatasetWriter:
    """Buffers batches and writes a file every `max_rows_per_file` rows (and the rest on
    `close()`). `columns` selects what is kept (those present in each batch)."""

    def __init__(self, path: str | os.PathLike, format: str = "parquet", max_rows_per_file: int = 100_000,
                 compression: str = "zstd", columns: Sequence[str] | None = OUTPUT_COLUMNS,
                 row_group_size: int = 16_384):
        if format not in FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, got {format!r}")
        if compression not in OUTPUT_COMPRESSIONS[format]:
            raise ValueError(f"output_compression for {format} must be one of {', '.join(OUTPUT_COMPRESSIONS[format])}, "
                             f"got {compression!r}")
        if max_rows_per_file < 1:
            raise ValueError(f"output_max_rows_per_file must be >= 1, got {max_rows_per_file}")
        self.path = Path(path)
        self.format = format
        self.compression = None if compression == "none" else compression
        self.max_rows_per_file = max_rows_per_file
        self.row_group_size = row_group_size
        self.columns = list(columns) if columns is not None else None
        self.files: list[Path] = []
        self.rows_written = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self._prefix = f"part-{stamp}-{os.getpid()}-{next(_file_counter)}"
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, batch: SampleBatch, extra: dict[str, pa.Array] | None = None) -> None:
        """Buffers `batch`'s rows; `extra` are Arrow columns appended to them (a multi-agent
        recording's string agent_id and policy_id, which a SampleBatch cannot hold)."""
        if self.columns is not None:
            batch = batch.select([c for c in self.columns if c in batch])
        rb = portable_record_batch(batch.to_arrow())
        for name, column in (extra or {}).items():
            rb = rb.append_column(pa.field(name, column.type, nullable=False), column)
        while len(rb):
            room = self.max_rows_per_file - self._pending_rows
            self._pending.append(rb.slice(0, room))
            self._pending_rows += min(room, len(rb))
            rb = rb.slice(room)
            if self._pending_rows >= self.max_rows_per_file:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one file (atomically) now."""
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending)
        self._pending, self._pending_rows = [], 0
        final = self.path / f"{self._prefix}-{len(self.files):06d}{FORMATS[self.format]}"
        tmp = self.path / f".{final.name}.tmp"  # hidden, and not a data extension: readers skip it
        try:
            if self.format == "parquet":
                pq.write_table(table, tmp, compression=self.compression, row_group_size=self.row_group_size)
            else:
                options = pa.ipc.IpcWriteOptions(compression=self.compression)
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as w:
                    w.write_table(table, max_chunksize=self.row_group_size)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.files.append(final)
        self.rows_written += table.num_rows

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
