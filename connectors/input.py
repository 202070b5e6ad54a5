"""Input connectors: stream an offline dataset as shuffled SampleBatches with bounded memory.

`Dataset.open(spec)` takes a file, a directory, a glob, a list of those, or `minari:DATASET_ID`;
Parquet and Arrow files may be named by URI (s3://, gs://, hdfs://, file://, or any fsspec scheme).
Formats: Parquet and Arrow IPC (flowrl's output, or any table with these columns), RLlib's
JSON output (one SampleBatch per line, columns possibly packed), and Minari datasets. Opening
checks every file's footer and the columns; bad input raises `DatasetError`, one line naming
the file and the column.

Reading goes chunk by chunk (a Parquet row group, an IPC record batch, a block of JSON lines,
a group of Minari episodes), in a random chunk order each epoch, through a shuffle buffer of
`shuffle_buffer_size` rows: memory stays at the buffer plus one chunk, however large the
dataset. On a Ray executor Parquet datasets are read through Ray Data instead, in parallel
across the cluster.

>>> import tempfile, numpy as np
>>> from flowrl.connectors.output import DatasetWriter
>>> from flowrl.sample_batch import SampleBatch
>>> path = tempfile.mkdtemp()
>>> with DatasetWriter(path) as w:
...     w.write(SampleBatch({"obs": np.arange(10.0)[:, None], "actions": np.arange(10)}))
>>> data = Dataset.open(path)
>>> data.num_rows, data.columns
(10, ['obs', 'actions'])
>>> batches = list(data.batches(["actions"], batch_size=4, shuffle_buffer_size=6, seed=0, num_epochs=1))
>>> [len(b) for b in batches], sorted(np.concatenate([b["actions"] for b in batches]).tolist()) == list(range(10))
([4, 4, 2], True)
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flowrl.sample_batch import SPACES_KEY, BatchLayout, SampleBatch, arrow_to_numpy
from flowrl.spaces import decode_spaces

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
              ".json": "json", ".jsonl": "json"}
JSON_BLOCK_LINES = 64  # RLlib lines hold a whole fragment each (hundreds of rows)
MINARI_BLOCK_EPISODES = 32
SHUFFLE_BLOCK_ROWS = 8192  # rows leaving the shuffle buffer at once
READ_AHEAD = 2  # chunks read ahead of the one in use, in turn by one background thread


class DatasetError(ValueError):
    """Bad offline input: one line naming the path (file) and the column."""


@dataclass(frozen=True)
class Chunk:
    """The unit read at once: a row group, an IPC record batch, a block of JSON lines, or a
    group of Minari episodes."""
    file: str
    index: int
    num_rows: int | None  # unknown for JSON blocks until read


# ---- finding files -------------------------------------------------------------------------------
def _is_data_file(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in EXTENSIONS


def is_uri(path: str) -> bool:
    """Whether `path` names a file through a filesystem URI (s3://, gs://, file://, ...)."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier()


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem a URI names and the path within it: pyarrow's own filesystems (s3://,
    gs://, hdfs://, file://), or an fsspec one for other schemes (memory://, az:// with adlfs,
    ...)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:  # a scheme pyarrow does not know: try fsspec's
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as e2:
            raise DatasetError(f"{uri}: unknown filesystem ({_short(e)}; fsspec: {_short(e2)})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{uri}: cannot reach the filesystem: {_short(e)}") from None


# Where each file found at a URI lives (its filesystem, made once per URI given, and its path).
_LOCATIONS: dict[str, tuple[pafs.FileSystem, str]] = {}


def _uri_files(item: str) -> list[str]:
    """resolve_files for one URI: its files as URIs."""
    fs, path = filesystem_of(item)
    scheme = item.partition("://")[0]

    def uri(p: str) -> str:
        name = f"{scheme}://{p}"
        _LOCATIONS[name] = (fs, p)
        return name

    def listing(directory: str) -> list[str]:
        try:
            infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{item}: cannot list: {_short(e)}") from None
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_data_file(i.path))

    if glob.has_magic(path):
        parts = path.split("/")
        fixed = "/".join(parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))])
        # fnmatch: '*' also matches across '/', so 'dir/*.parquet' finds files in subfolders too.
        matches = [uri(p) for p in listing(fixed) if fnmatch.fnmatchcase(p, path)]
        if not matches:
            raise DatasetError(f"{item}: no data files match this pattern")
        return matches
    try:
        info = fs.get_file_info(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{item}: cannot read: {_short(e)}") from None
    if info.type == pafs.FileType.Directory:
        found = [uri(p) for p in listing(path)]
        if not found:
            raise DatasetError(f"{item}: an empty dataset (no {', '.join(sorted(set(EXTENSIONS)))} files)")
        return found
    if info.type == pafs.FileType.File:
        if os.path.splitext(path)[1].lower() not in EXTENSIONS:
            raise DatasetError(f"{item}: unknown dataset format (expected {', '.join(sorted(EXTENSIONS))})")
        _LOCATIONS[item] = (fs, path)
        return [item]
    raise DatasetError(f"{item}: no such file or directory")


def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The data files a path, directory, glob or list of those names, in a stable order. URIs
    (s3://bucket/dataset/, gs://..., file:///...) name files through their filesystem."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DatasetError("input: an empty list names no dataset")
    files: list[str] = []
    for item in items:
        item = os.fspath(item)
        if is_uri(item):
            files.extend(_uri_files(item))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and _is_data_file(p))
            if not matches:
                raise DatasetError(f"{item}: no data files match this pattern")
            files.extend(matches)
        elif os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and _is_data_file(str(p)))
            if not found:
                raise DatasetError(f"{item}: an empty dataset (no {', '.join(sorted(set(EXTENSIONS)))} files)")
            files.extend(found)
        elif os.path.isfile(item):
            if os.path.splitext(item)[1].lower() not in EXTENSIONS:
                raise DatasetError(f"{item}: unknown dataset format (expected {', '.join(sorted(EXTENSIONS))})")
            files.append(item)
        else:
            raise DatasetError(f"{item}: no such file or directory")
    return files


def locate(file: str) -> tuple[pafs.FileSystem | None, str]:
    """Where to read a file that resolve_files gave: (None, path) for a local path, else the
    URI's filesystem and the path within it."""
    if not is_uri(file):
        return None, file
    return _LOCATIONS.get(file) or filesystem_of(file)


def _format_of(files: list[str]) -> str:
    formats = {EXTENSIONS[os.path.splitext(f)[1].lower()] for f in files}
    if len(formats) > 1:
        raise DatasetError(f"{files[0]}: one dataset mixes formats ({', '.join(sorted(formats))})")
    return formats.pop()


# ---- formats -------------------------------------------------------------------------------------
class _Files:
    """A format whose files share one schema, checked file by file."""

    schema: pa.Schema | None = None

    def _check_schema(self, f: str, schema: pa.Schema) -> None:
        if self.schema is None:
            self.schema = schema
            self.first = f
            return
        for field in self.schema:
            other = schema.field(field.name) if field.name in schema.names else None
            if other is None:
                raise DatasetError(f"{f}: missing column {field.name!r} (present in {self.first})")
            if other.type != field.type:
                raise DatasetError(f"{f}: column {field.name!r} is {other.type}, but {field.type} in {self.first}")


class _Parquet(_Files):
    def __init__(self, files: list[str]):
        self.files = files
        self.schema = None
        self.chunks: list[Chunk] = []
        self._metadata: dict[str, pq.FileMetaData] = {}
        for f in files:
            fs, path = locate(f)
            try:
                meta = pq.read_metadata(path, filesystem=fs)
                schema = pq.read_schema(path, filesystem=fs)
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(f"{f}: not a readable Parquet file (truncated or corrupt?): {_short(e)}") from None
            self._check_schema(f, schema)
            self._metadata[f] = meta
            self.chunks.extend(Chunk(f, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))

    def read(self, chunk: Chunk, columns: list[str] | None) -> pa.Table:
        # One row group, decoded in the reading thread alone: on 2 cores this was as fast as
        # two reading threads or Arrow's own pool, with less memory and CPU (measured with
        # benchmarks/offline.py). Opening with the footer read at open time costs no more than
        # keeping a reader open, which would hold on to its last buffers (about 0.8 MiB).
        # Column chunks are read one by one (no pre-buffering), so the compressed and decoded
        # copies of a whole row group are never in memory together.
        fs, path = locate(chunk.file)
        with pq.ParquetFile(path, metadata=self._metadata[chunk.file], filesystem=fs) as reader:
            return reader.read_row_group(chunk.index, columns=columns, use_threads=False)


class _ArrowIPC(_Files):
    def __init__(self, files: list[str]):
        self.files = files
        self.schema = None
        self.chunks = []
        self._open = None
        for f in files:
            try:
                reader = pa.ipc.open_file(self._source(f))
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(f"{f}: not a readable Arrow IPC file (truncated or corrupt?): {_short(e)}") from None
            self._check_schema(f, reader.schema)
            # Record batch lengths sit in each batch's header; reading one is a memory-mapped view.
            self.chunks.extend(Chunk(f, i, reader.get_batch(i).num_rows) for i in range(reader.num_record_batches))

    @staticmethod
    def _source(f: str) -> pa.NativeFile:
        """A local file memory-mapped (reading a record batch is a view), a remote one opened
        for random access (reading a record batch fetches just its bytes)."""
        fs, path = locate(f)
        return pa.memory_map(path) if fs is None else fs.open_input_file(path)

    def read(self, chunk: Chunk, columns: list[str] | None) -> pa.Table:
        if self._open is None or self._open[0] != chunk.file:
            self._open = (chunk.file, pa.ipc.open_file(self._source(chunk.file)))
        rb = self._open[1].get_batch(chunk.index)
        return pa.Table.from_batches([rb.select(columns) if columns is not None else rb])


class _RLlibJSON:
    """RLlib's JsonWriter output: one SampleBatch (or single-policy MultiAgentBatch) per line.
    Columns RLlib packed (base64 of lz4 of a pickle) are read without unpickling."""

    RENAMES = {"dones": "terminateds"}
    SKIP = {"type", "count", "infos", "policy_batches", "_is_training", "zero_padded", "_max_seq_len",
            "seq_lens", "state_in_0", "state_out_0"}

    def __init__(self, files: list[str]):
        self.files = files
        self.chunks = []
        # Where each block of JSON_BLOCK_LINES lines starts (line number, byte offset), so that
        # reading a block seeks to it instead of reading the file from the top.
        self.starts: dict[tuple[str, int], tuple[int, int]] = {}
        for f in files:
            for block, start in enumerate(self._block_starts(f)):
                self.starts[(f, block)] = start
                self.chunks.append(Chunk(f, block, None))
        if not self.chunks:
            raise DatasetError(f"{files[0]}: an empty dataset (no lines)")
        self.schema = self.read(self.chunks[0], None).schema

    @staticmethod
    def _block_starts(f: str) -> list[tuple[int, int]]:
        starts, lineno, offset = [], 0, 0
        with open(f, "rb") as fh:
            for line in fh:
                if line.strip():
                    if lineno % JSON_BLOCK_LINES == 0:
                        starts.append((lineno, offset))
                    lineno += 1
                offset += len(line)
        return starts

    def _row_block(self, f: str, lineno: int, record: dict) -> dict[str, np.ndarray]:
        from flowrl.connectors.safe_unpack import UnsafePickleError, unpack_column

        if record.get("type") == "MultiAgentBatch":
            policies = record.get("policy_batches") or {}
            if len(policies) != 1:
                raise DatasetError(f"{f}: line {lineno}: a MultiAgentBatch with {len(policies)} policies; "
                                   "flowrl reads single-policy data")
            record = next(iter(policies.values()))
        out = {}
        for key, value in record.items():
            if key in self.SKIP:
                continue
            name = self.RENAMES.get(key, key)
            try:
                arr = unpack_column(value) if isinstance(value, str) else np.asarray(value)
            except UnsafePickleError as e:
                raise DatasetError(f"{f}: line {lineno}: column {key!r}: {e}") from None
            except ValueError:
                raise DatasetError(f"{f}: line {lineno}: column {key!r}: ragged values") from None
            if arr.dtype == object or arr.dtype.kind not in "biuf":
                continue  # infos and other non-numeric extras
            if arr.dtype == np.float64 and name != "rewards":
                arr = arr.astype(np.float32)
            out[name] = arr
        return out

    def read(self, chunk: Chunk, columns: list[str] | None) -> pa.Table:
        blocks = []
        first, offset = self.starts[(chunk.file, chunk.index)]
        with open(chunk.file, "rb") as fh:
            fh.seek(offset)
            lineno = first
            for line in fh:
                if not line.strip():
                    continue
                lineno += 1
                if len(blocks) == JSON_BLOCK_LINES:
                    break
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DatasetError(f"{chunk.file}: line {lineno}: not JSON ({getattr(e, 'msg', e)})") from None
                if not isinstance(record, dict):
                    raise DatasetError(f"{chunk.file}: line {lineno}: expected a JSON object (a SampleBatch)")
                blocks.append(self._row_block(chunk.file, lineno, record))
        names = list(blocks[0]) if blocks else []
        try:
            columns_out = {n: np.concatenate([b[n] for b in blocks]) for n in names}
            batch = SampleBatch(columns_out)
        except (KeyError, ValueError) as e:
            raise DatasetError(f"{chunk.file}: lines {first + 1}-{first + len(blocks)}: "
                               f"inconsistent columns ({e})") from None
        table = pa.Table.from_batches([batch.to_arrow()])
        return table.select(columns) if columns is not None else table


class _Minari:
    """A Minari dataset (`minari:DATASET_ID`), episode by episode: obs are the observations
    without the last, new_obs without the first."""

    def __init__(self, dataset_id: str):
        try:
            import minari
        except ImportError:
            raise DatasetError(f"minari:{dataset_id}: reading Minari datasets needs the minari package "
                               "(pip install 'flowrl[minari]')") from None
        try:
            self.dataset = minari.load_dataset(dataset_id)
        except Exception as e:  # minari raises several types for unknown ids
            raise DatasetError(f"minari:{dataset_id}: cannot load ({type(e).__name__}: {_short(e)})") from None
        self.files = [f"minari:{dataset_id}"]
        ids = sorted(int(i) for i in self.dataset.episode_indices)
        self.episode_ids = ids
        self.chunks = [Chunk(self.files[0], i, None) for i in range(0, len(ids), MINARI_BLOCK_EPISODES)]
        if not self.chunks:
            raise DatasetError(f"minari:{dataset_id}: an empty dataset (no episodes)")
        self.spaces = {"obs": self.dataset.observation_space, "new_obs": self.dataset.observation_space,
                       "actions": self.dataset.action_space}
        self.schema = self.read(self.chunks[0], None).schema

    def read(self, chunk: Chunk, columns: list[str] | None) -> pa.Table:
        from flowrl.policy import obs_to_array

        space = self.dataset.observation_space
        parts = []
        for episode in self.dataset.iterate_episodes(self.episode_ids[chunk.index:chunk.index + MINARI_BLOCK_EPISODES]):
            obs = obs_to_array(space, episode.observations)
            n = len(episode.actions)
            parts.append({"eps_id": np.full(n, int(episode.id), np.int64), "t": np.arange(n, dtype=np.int64),
                          "obs": obs[:-1], "new_obs": obs[1:], "actions": np.asarray(episode.actions),
                          "rewards": np.asarray(episode.rewards, np.float32),
                          "terminateds": np.asarray(episode.terminations, bool),
                          "truncateds": np.asarray(episode.truncations, bool)})
        columns_out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        table = pa.Table.from_batches([SampleBatch(columns_out, self.spaces).to_arrow()])
        return table.select(columns) if columns is not None else table


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# ---- the dataset ---------------------------------------------------------------------------------
class Dataset:
    """An opened offline dataset: its files, format, schema, spaces and chunks."""

    def __init__(self, source, format: str, where: str):
        self.source = source
        self.format = format
        self.where = where  # how errors name the dataset
        self.files: list[str] = source.files
        self.chunks: list[Chunk] = source.chunks
        self.schema: pa.Schema = source.schema
        self.spaces: dict[str, gym.Space] = getattr(source, "spaces", None) or _schema_spaces(self.schema, where)

    @classmethod
    def open(cls, spec: Any) -> "Dataset":
        if isinstance(spec, str) and spec.startswith("minari:"):
            return cls(_Minari(spec[len("minari:"):]), "minari", spec)
        from flowrl.connectors.multi_agent import policy_ids

        if (policies := policy_ids(spec)) is not None:  # rows of several policies, whose spaces may differ
            raise DatasetError(f"{os.fspath(spec)}: a multi-agent dataset; read one policy's rows (input_policy_id: "
                               f"one of {', '.join(policies)})")
        files = resolve_files(spec)
        fmt = _format_of(files)
        if fmt == "json" and any(is_uri(f) for f in files):
            raise DatasetError(f"{next(f for f in files if is_uri(f))}: RLlib JSON datasets are read from local "
                               "files; copy them here first (Parquet and Arrow datasets can stay at a URI)")
        source = {"parquet": _Parquet, "arrow": _ArrowIPC, "json": _RLlibJSON}[fmt](files)
        where = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else files[0]
        data = cls(source, fmt, where)
        if data.num_rows == 0:
            raise DatasetError(f"{where}: an empty dataset (0 rows)")
        return data

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def num_rows(self) -> int | None:
        """Rows in the dataset, when the format records it (Parquet, Arrow)."""
        if any(c.num_rows is None for c in self.chunks):
            return None
        return sum(c.num_rows for c in self.chunks)

    def column_shape(self, name: str) -> tuple[int, ...]:
        """The per-row shape of a column: () for scalars."""
        t = self.schema.field(name).type
        if isinstance(t, pa.FixedShapeTensorType):
            return tuple(t.shape)
        shape = []
        while pa.types.is_fixed_size_list(t):
            shape.append(t.list_size)
            t = t.value_type
        return tuple(shape)

    def check(self, required: Sequence[str], spaces: dict[str, gym.Space] | None = None) -> None:
        """DatasetError unless the dataset has `required` columns whose shapes fit `spaces`
        (default: the dataset's own)."""
        missing = [c for c in required if c not in self.schema.names]
        if missing:
            raise DatasetError(f"{self.where}: missing column{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(repr, missing))} (the dataset has: {', '.join(self.columns)})")
        for name, space in (spaces or self.spaces).items():
            if name not in self.schema.names:
                continue
            expected = expected_shape(name, space)
            if expected is not None and self.column_shape(name) != expected:
                raise DatasetError(f"{self.where}: column {name!r} has rows of shape {self.column_shape(name)}, "
                                   f"but the space {space} needs {expected}")

    def read(self, chunk: Chunk, columns: list[str] | None = None) -> pa.Table:
        try:
            return self.source.read(chunk, columns)
        except DatasetError:
            raise
        except (pa.ArrowException, OSError, ValueError) as e:
            where = f"{chunk.file}: row group {chunk.index}" if self.format == "parquet" else chunk.file
            raise DatasetError(f"{where}: cannot be read (truncated or corrupt?): {_short(e)}") from None

    def scan(self, columns: list[str] | None = None, rng: np.random.Generator | None = None) -> Iterator[dict]:
        """Each chunk once, as numpy columns; in a random chunk order when `rng` is given. Up to
        READ_AHEAD chunks are read and converted ahead of the consumer in a background thread
        (Arrow decodes without the GIL), so decoding overlaps with whatever the consumer does."""
        from concurrent.futures import ThreadPoolExecutor

        order = rng.permutation(len(self.chunks)) if rng is not None else range(len(self.chunks))
        chunks = [self.chunks[i] for i in order]
        if not chunks:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="flowrl:dataset-read")
        try:
            futures = [pool.submit(self._read_numpy, c, columns) for c in chunks[:READ_AHEAD]]
            for i in range(len(chunks)):
                cols = futures.pop(0).result()
                if i + READ_AHEAD < len(chunks):
                    futures.append(pool.submit(self._read_numpy, chunks[i + READ_AHEAD], columns))
                if cols and len(next(iter(cols.values()))):
                    yield cols
                del cols  # not held while the next chunk is awaited
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_numpy(self, chunk: Chunk, columns: list[str] | None) -> dict[str, np.ndarray]:
        table = self.read(chunk, columns)
        try:
            return arrow_to_numpy(table)
        except ValueError as e:
            raise DatasetError(f"{chunk.file}: {e}") from None

    def batches(self, columns: Sequence[str], batch_size: int, shuffle_buffer_size: int = 50_000,
                seed: int | None = None, num_epochs: int | None = None) -> Iterator[SampleBatch]:
        """SampleBatches of `batch_size` rows of `columns`, shuffled through a buffer of
        `shuffle_buffer_size` rows, for `num_epochs` passes (None: forever)."""
        rng = np.random.default_rng(seed)
        columns = list(columns)
        spaces = {k: v for k, v in self.spaces.items() if k in columns}

        def chunks():
            epoch = 0
            while num_epochs is None or epoch < num_epochs:
                yield from self.scan(columns, rng)
                epoch += 1

        # Rows leave the buffer in blocks of several batches, which are cut into batches without
        # copying; a BatchLayout wraps each batch's column slices without Arrow work.
        layout = None
        for cols in shuffled(chunks(), batch_size, shuffle_buffer_size, rng):
            if layout is None:
                layout = BatchLayout(cols, spaces)
            yield from layout.batches(cols, batch_size)
            del cols  # not held while the next block is drawn


def _schema_spaces(schema: pa.Schema, where: str) -> dict[str, gym.Space]:
    raw = (schema.metadata or {}).get(SPACES_KEY)
    if raw is None:
        return {}
    try:
        return decode_spaces(raw)
    except ValueError as e:
        raise DatasetError(f"{where}: schema metadata {SPACES_KEY.decode()}: {e}") from None


def expected_shape(name: str, space: gym.Space) -> tuple[int, ...] | None:
    """The per-row shape a column takes in a batch: actions as the env gives them, observations
    as the policy reads them (Box as is, everything else flattened)."""
    from flowrl.policy import flat_obs_size

    if name == "actions":
        return () if isinstance(space, gym.spaces.Discrete) else tuple(space.shape)
    if isinstance(space, gym.spaces.Box):
        return tuple(space.shape)
    try:
        return (flat_obs_size(space),)
    except ValueError:
        return None


# ---- shuffling -----------------------------------------------------------------------------------
def _row_view(column: np.ndarray) -> np.ndarray:
    """A 1-D view of `column` with one fixed-width element per row: numpy gathers and scatters
    these much faster than rows of a 2-D array."""
    column = np.ascontiguousarray(column)
    n = len(column)
    width = column.itemsize * (column.size // n if n else int(np.prod(column.shape[1:], dtype=np.int64)))
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(width, np.dtype(f"V{width}"))
    return column.reshape(n, -1).view(dtype).reshape(n)


def shuffled(chunks: Iterator[dict[str, np.ndarray]], batch_size: int, capacity: int,
             rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `chunks` (dicts of numpy columns) in random order, through a buffer of
    `capacity` rows, as dicts of columns whose lengths are multiples of `batch_size` (only the
    last may be shorter).

    The first `capacity` rows fill the buffer. Then each incoming row takes the slot of a
    buffered row, which leaves: the slots are visited in a random order, a fresh one each time
    all have been visited, so rows leave in random order after staying for between 1 and
    2 * capacity arrivals. When the input ends, the buffer empties in random order. Each step
    is a gather and a scatter per column of SHUFFLE_BLOCK_ROWS rows or fewer, with no per-row
    Python work and no copy of the buffer.

    >>> rng = np.random.default_rng(0)
    >>> parts = ({"x": np.arange(i, i + 5)} for i in range(0, 20, 5))
    >>> out = [b["x"] for b in shuffled(parts, batch_size=6, capacity=8, rng=rng)]
    >>> [len(x) for x in out], sorted(np.concatenate(out).tolist()) == list(range(20))
    ([6, 6, 6, 2], True)
    """
    if batch_size < 1 or capacity < 1:
        raise ValueError("batch_size and shuffle buffer capacity must be >= 1")
    block = batch_size * max(1, SHUFFLE_BLOCK_ROWS // batch_size)
    buf: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}  # buf's columns as row views
    filled = 0
    order = np.arange(capacity, dtype=np.int32 if capacity < 2**31 else np.int64)  # half the memory of int64
    visited = capacity  # slots of `order` visited so far; all: a new order is due
    pending: list[dict[str, np.ndarray]] = []  # pieces (copies) of a batch not yet full
    pending_rows = 0

    def joined() -> dict[str, np.ndarray]:
        return {name: np.concatenate([piece[name] for piece in pending]) for name in pending[0]}

    def whole_batches(cols: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """`cols` after topping up the pending batch, cut at a multiple of batch_size; the rest
        is kept pending."""
        nonlocal pending, pending_rows
        n, start = len(next(iter(cols.values()))), 0
        if pending:
            start = min(batch_size - pending_rows, n)
            pending.append({name: value[:start].copy() for name, value in cols.items()})
            pending_rows += start
            if pending_rows < batch_size:
                return
            yield joined()
            pending, pending_rows = [], 0
        end = start + (n - start) // batch_size * batch_size
        if end > start:
            yield cols if (start, end) == (0, n) else {name: value[start:end] for name, value in cols.items()}
        if end < n:
            pending, pending_rows = [{name: value[end:].copy() for name, value in cols.items()}], n - end

    def leaving(slots: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, column in rows.items():
            full = buf[name]
            out[name] = np.take(column, slots).view(full.dtype).reshape(len(slots), *full.shape[1:])
        return out

    for cols in chunks:
        if not buf:
            buf = {name: np.empty((capacity, *value.shape[1:]), value.dtype) for name, value in cols.items()}
            rows = {name: _row_view(column) for name, column in buf.items()}
        n, pos = len(next(iter(cols.values()))), 0
        while pos < n:
            if filled < capacity:
                k = min(capacity - filled, n - pos)
                for name, value in cols.items():
                    buf[name][filled:filled + k] = value[pos:pos + k]
                filled += k
            else:
                if visited == capacity:
                    rng.shuffle(order)
                    visited = 0
                k = min(block, n - pos, capacity - visited)
                slots = order[visited:visited + k].astype(np.intp)  # numpy indexes with intp
                visited += k
                out = leaving(slots)
                for name, column in rows.items():
                    column[slots] = _row_view(cols[name][pos:pos + k])
                yield from whole_batches(out)
                del out  # the consumer may hold these rows; this generator should not
            pos += k
        del cols  # its rows are in the buffer now: free it while the next chunk is read
    if filled:
        rest = order if filled == capacity else np.arange(filled, dtype=order.dtype)
        rng.shuffle(rest)
        for start in range(0, filled, block):
            yield from whole_batches(leaving(rest[start:start + block].astype(np.intp)))
    if pending:
        yield joined()
