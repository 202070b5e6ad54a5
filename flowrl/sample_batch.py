"""SampleBatch: an immutable table of equal-length columns backed by one Arrow RecordBatch.

One row per environment step. 1-D columns are plain Arrow arrays; columns with trailing
dimensions are Arrow fixed-shape tensors; 1-D booleans use Arrow's canonical ``bool8`` (one
byte per value) so that reading them is a view too. Spaces travel in the schema metadata,
encoded with msgpack.

>>> import numpy as np
>>> b = SampleBatch({"obs": np.zeros((3, 2), np.float32), "rewards": np.array([1.0, 0.0, 2.0])})
>>> len(b), b["obs"].shape, b.columns
(3, (3, 2), ['obs', 'rewards'])
>>> float(b[1:3]["rewards"].sum())
2.0
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pyarrow as pa

from flowrl.spaces import decode_spaces, encode_spaces

SPACES_KEY = b"flowrl.spaces"
# Episodes that finished while the rows were sampled: msgpack [[return, length], ...].
EPISODES_KEY = b"flowrl.episodes"
# Sub-envs that raised and were made anew while the rows were sampled (a decimal count).
ENV_FAULTS_KEY = b"flowrl.env_faults"
# What the normalize preset's statistics gained while the rows were sampled (flowrl.normalize):
# msgpack {"obs": [count, mean, m2], "ret": [...]}.
NORMALIZE_KEY = b"flowrl.normalize_delta"
# What the batch as a whole reports, not its rows: dropped by row selections, summed by concat.
SUMMARY_KEYS = (EPISODES_KEY, ENV_FAULTS_KEY, NORMALIZE_KEY)
# Arrow has no multi-dimensional bool8; such columns are stored as uint8 tensors and marked.
_DTYPE_KEY = b"flowrl.numpy_dtype"

_SUPPORTED_KINDS = "biuf"  # bool, signed int, unsigned int, float


def _check_column(name: str, value: Any, num_rows: int | None) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise ValueError(f"column names must be non-empty strings, got {name!r}")
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except ValueError as e:  # numpy refuses ragged nested lists outright
        raise ValueError(f"column {name!r}: ragged or irregular data ({e})") from None
    if arr.dtype == object:
        raise ValueError(f"column {name!r}: object dtype (ragged or mixed data) is not supported")
    if arr.dtype.kind not in _SUPPORTED_KINDS:
        raise ValueError(f"column {name!r}: dtype {arr.dtype} is not supported "
                         "(bool, int8-64, uint8-64, float16/32/64)")
    if arr.ndim == 0:
        raise ValueError(f"column {name!r}: a scalar has no rows; give an array with a leading row dimension")
    if 0 in arr.shape[1:]:
        raise ValueError(f"column {name!r}: trailing dimensions must be non-zero, got shape {arr.shape}")
    if num_rows is not None and len(arr) != num_rows:
        raise ValueError(f"column {name!r} has {len(arr)} rows, expected {num_rows} like the other columns")
    return arr


# pa.array(ndarray) and Array.to_numpy look for pandas objects and so import pandas (0.3-0.5 s of
# a short run's start-up); columns go in and out through their buffers instead.
def _primitive_array(arr: np.ndarray) -> pa.Array:
    """A 1-D contiguous numeric `arr` as an Arrow array over its memory (no copy)."""
    return pa.Array.from_buffers(pa.from_numpy_dtype(arr.dtype), len(arr), [None, pa.py_buffer(arr)])


def _primitive_view(array: pa.Array) -> np.ndarray:
    """A numeric Arrow array without nulls as a numpy view of its buffer (no copy); other types
    as Arrow converts them (which raises where no view is possible)."""
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        return array.to_numpy(zero_copy_only=True)
    dtype = np.dtype(array.type.to_pandas_dtype())
    if len(array) == 0:  # an empty array may have no data buffer
        return np.empty(0, dtype)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _tensor_array(arr: np.ndarray) -> pa.Array:
    """A fixed-shape tensor column over `arr`'s memory (no copy), for any number of rows."""
    shape = list(arr.shape[1:])
    values = _primitive_array(arr.reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(values, int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(values.type, shape), storage)


def _to_arrow_column(arr: np.ndarray) -> tuple[pa.Array, dict[bytes, bytes] | None]:
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 1:
        if arr.dtype == np.bool_:
            return pa.ExtensionArray.from_storage(pa.bool8(), _primitive_array(arr.view(np.int8))), None
        return _primitive_array(arr), None
    if arr.dtype == np.bool_:
        return _tensor_array(arr.view(np.uint8)), {_DTYPE_KEY: b"bool"}
    return _tensor_array(arr), None


def _column_view(array: pa.Array, field: pa.Field) -> np.ndarray:
    if isinstance(array.type, pa.FixedShapeTensorType):
        view = _primitive_view(array.storage.flatten()).reshape(len(array), *array.type.shape)  # also when empty
        if field.metadata and field.metadata.get(_DTYPE_KEY) == b"bool":
            view = view.view(np.bool_)
    elif isinstance(array.type, pa.Bool8Type):
        view = _primitive_view(array.storage).view(np.bool_)
    else:
        view = _primitive_view(array)
    view.flags.writeable = False
    return view


def _one_chunk(name: str, array: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if array.null_count:
        raise ValueError(f"column {name!r}: contains {array.null_count} null values")
    return array


def _fixed_size_list_values(name: str, array: pa.Array) -> np.ndarray:
    """A (nested) fixed-size list column, as a reader that dropped the tensor type writes one:
    its values with the rows' shape."""
    shape = [array.type.list_size]
    inner = array
    while pa.types.is_fixed_size_list(inner.type.value_type):
        inner = inner.flatten()
        shape.append(inner.type.list_size)
    values = inner.flatten()
    _require_numeric(name, values.type)
    return values.to_numpy(zero_copy_only=False).reshape([len(array), *shape])


def _normalize_arrow_column(name: str, array: pa.Array | pa.ChunkedArray, field: pa.Field) -> pa.Array:
    """Accept what other Arrow writers produce; reject what a SampleBatch cannot hold."""
    array = _one_chunk(name, array)
    t = array.type
    if isinstance(t, pa.Bool8Type) or isinstance(t, pa.FixedShapeTensorType):
        value_type = t.value_type if isinstance(t, pa.FixedShapeTensorType) else pa.int8()
    elif pa.types.is_boolean(t):
        return pa.Bool8Array.from_numpy(array.to_numpy(zero_copy_only=False))
    elif pa.types.is_fixed_size_list(t):
        return _tensor_array(_fixed_size_list_values(name, array))
    else:
        value_type = t
    _require_numeric(name, value_type)
    return array


def arrow_to_numpy(data: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """The columns of an Arrow table as `SampleBatch.from_arrow(data).to_numpy()` gives them,
    without building the batch: read-only views where Arrow's layout allows (numbers, bool8,
    tensors), copies for bit-packed booleans and untyped fixed-size lists."""
    out = {}
    for name, field, column in zip(data.schema.names, data.schema, data.columns):
        array = _one_chunk(name, column)
        t = array.type
        if pa.types.is_boolean(t):
            out[name] = array.to_numpy(zero_copy_only=False)
        elif pa.types.is_fixed_size_list(t):
            out[name] = _fixed_size_list_values(name, array)
        else:
            if isinstance(t, pa.FixedShapeTensorType):
                _require_numeric(name, t.value_type)
            elif not isinstance(t, pa.Bool8Type):
                _require_numeric(name, t)
            out[name] = _column_view(array, field)
    return out


def _require_numeric(name: str, t: pa.DataType) -> None:
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or isinstance(t, pa.Bool8Type)):
        raise ValueError(f"column {name!r}: Arrow type {t} is not supported (numeric, bool or fixed-shape tensor)")


def _summary(arr: np.ndarray) -> str:
    text = f"np.ndarray({tuple(arr.shape)}, dtype={arr.dtype}"
    if arr.size:
        a = arr.astype(np.float64) if arr.dtype == np.bool_ else arr
        text += f", min={a.min():.4g}, max={a.max():.4g}, mean={a.mean():.4g}"
    return text + ")"


@dataclass(frozen=True)
class _ColumnPlan:
    """How a column's raw values buffer becomes an Arrow array or a numpy view."""
    extension: pa.BaseExtensionType | None  # wraps the storage array, when the type is one
    value_type: pa.DataType             # the values' Arrow type
    size: int                           # values per row of a tensor column, 0 for 1-D columns
    dtype: np.dtype                     # the numpy view's dtype (bool for bool columns)
    shape: tuple[int, ...]              # per-row shape of the numpy view


@functools.lru_cache(maxsize=128)
def _read_schema(schema_bytes: bytes) -> tuple[pa.Schema, tuple[_ColumnPlan, ...], dict[str, gym.Space]]:
    """The schema, a plan per column, and the spaces. Batches from one source share a
    schema: this runs once per schema per process."""
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    plans = []
    for field in schema:
        t = field.type
        if isinstance(t, pa.FixedShapeTensorType):
            is_bool = bool(field.metadata) and field.metadata.get(_DTYPE_KEY) == b"bool"
            dtype = np.dtype(bool) if is_bool else np.dtype(t.value_type.to_pandas_dtype())
            plans.append(_ColumnPlan(t, t.value_type, int(np.prod(t.shape)), dtype, tuple(t.shape)))
        elif isinstance(t, pa.BaseExtensionType):  # bool8: one byte per value
            plans.append(_ColumnPlan(t, t.storage_type, 0, np.dtype(bool), ()))
        else:
            plans.append(_ColumnPlan(None, t, 0, np.dtype(t.to_pandas_dtype()), ()))
    meta = schema.metadata or {}
    spaces = decode_spaces(meta[SPACES_KEY]) if SPACES_KEY in meta else {}
    return schema, tuple(plans), spaces


def _arrow_from_raw(schema: pa.Schema, plans: tuple[_ColumnPlan, ...], rows: int, buffers: list) -> pa.RecordBatch:
    arrays = []
    from_buffers = pa.Array.from_buffers
    for plan, buf in zip(plans, buffers):
        data = pa.py_buffer(buf)
        if plan.size:  # a fixed-shape tensor: a fixed-size list over the flat values
            storage = pa.FixedSizeListArray.from_arrays(from_buffers(plan.value_type, rows * plan.size, [None, data]),
                                                        plan.size)
        else:
            storage = from_buffers(plan.value_type, rows, [None, data])
        arrays.append(pa.ExtensionArray.from_storage(plan.extension, storage) if plan.extension is not None
                      else storage)
    if not arrays:
        return pa.RecordBatch.from_pylist([], schema=schema)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _values_buffer(array: pa.Array) -> pa.Buffer:
    """The bytes of a column's values (a slice of its Arrow buffer when the column is a slice).
    Columns have no nulls; bool columns are bool8 (a byte each)."""
    if isinstance(array.type, pa.FixedShapeTensorType):
        array = array.storage.flatten()  # the list's values, with the list's offset applied
    elif isinstance(array.type, pa.BaseExtensionType):
        array = array.storage
    width = array.type.bit_width // 8
    return array.buffers()[1].slice(array.offset * width, len(array) * width)


def _rebuild(schema_bytes: bytes, rows: int, buffers: list) -> "SampleBatch":
    """Unpickle target: column data arrives as raw buffers (out of band under protocol 5). The
    batch keeps them as they are: a column read is a numpy view over its buffer, and the Arrow
    record batch is assembled (without copying) only when an Arrow operation needs it."""
    return _raw_batch(*_read_schema(schema_bytes), rows, buffers)


def _raw_batch(schema: pa.Schema, plans: tuple[_ColumnPlan, ...], spaces: dict[str, gym.Space], rows: int,
               buffers: list) -> "SampleBatch":
    """A batch over raw column buffers (see _rebuild), laid out as `plans` says."""
    self = SampleBatch.__new__(SampleBatch)
    self._batch, self._schema, self._num_rows = None, schema, rows
    self._raw = (plans, buffers)
    self._spaces = dict(spaces)
    self._views = {}
    return self


def _from_ipc_bytes(data: bytes) -> "SampleBatch":
    return SampleBatch.from_ipc(data)


class BatchLayout:
    """The columns (names, dtypes, row shapes) and spaces shared by a stream of batches.

    `layout.batch(columns)` wraps C-contiguous numpy columns of that layout as a SampleBatch
    with a few cheap checks and no Arrow work: the record batch is assembled (still without a
    copy) only if an Arrow operation asks for it, as for a batch that arrived through Ray. For
    streams of many small batches, such as minibatches cut from a shuffle buffer.

    >>> layout = BatchLayout({"obs": np.zeros((0, 2), np.float32), "done": np.zeros(0, bool)})
    >>> b = layout.batch({"obs": np.ones((3, 2), np.float32), "done": np.array([0, 0, 1], bool)})
    >>> len(b), b["obs"].shape, b == SampleBatch(b.to_numpy())
    (3, (3, 2), True)
    """

    def __init__(self, example: Mapping[str, Any], spaces: Mapping[str, gym.Space] | None = None):
        first = SampleBatch({name: np.asarray(value)[:0] for name, value in example.items()}, spaces)
        self.names = first.columns
        self._schema, self._plans, self._spaces = _read_schema(first._schema.serialize().to_pybytes())

    def batch(self, columns: Mapping[str, np.ndarray]) -> "SampleBatch":
        rows = self._check(columns)
        return _raw_batch(self._schema, self._plans, self._spaces, rows, list(columns.values()))

    def batches(self, columns: Mapping[str, np.ndarray], size: int) -> Iterator["SampleBatch"]:
        """Consecutive batches of `size` rows (the last may be shorter) over slices of `columns`,
        which are checked once."""
        rows = self._check(columns)
        arrays = list(columns.values())
        for start in range(0, rows, size):
            yield _raw_batch(self._schema, self._plans, self._spaces, min(size, rows - start),
                             [a[start:start + size] for a in arrays])

    def _check(self, columns: Mapping[str, np.ndarray]) -> int:
        if list(columns) != self.names:
            raise ValueError(f"columns {list(columns)} do not match the layout's {self.names}")
        arrays = list(columns.values())
        rows = len(arrays[0]) if arrays else 0
        for name, arr, plan in zip(self.names, arrays, self._plans):
            if arr.dtype != plan.dtype or arr.shape[1:] != plan.shape or len(arr) != rows \
                    or not arr.flags.c_contiguous:
                raise ValueError(f"column {name!r}: {arr.dtype}{list(arr.shape)} (contiguous: "
                                 f"{arr.flags.c_contiguous}) does not fit the layout's "
                                 f"{plan.dtype}{list(plan.shape)} with {rows} rows")
        return rows


class SampleBatch(Mapping):
    """An immutable batch of experience; see the module docstring."""

    # _batch is the Arrow record batch; a batch unpickled from raw buffers (see _rebuild) holds
    # them in _raw instead until an Arrow operation asks for _rb.
    __slots__ = ("_batch", "_raw", "_schema", "_num_rows", "_spaces", "_views")

    def __init__(self, columns: Mapping[str, Any] | None = None,
                 spaces: Mapping[str, gym.Space] | None = None,
                 episodes: Sequence[tuple[float, int]] | None = None, env_faults: int = 0,
                 normalize_delta: dict[str, list] | None = None):
        columns = dict(columns or {})
        num_rows = None
        arrays, fields = [], []
        for name, value in columns.items():
            arr = _check_column(name, value, num_rows)
            num_rows = len(arr)
            column, meta = _to_arrow_column(arr)
            arrays.append(column)
            fields.append(pa.field(name, column.type, nullable=False, metadata=meta))
        spaces = dict(spaces or {})
        for k, s in spaces.items():
            if not isinstance(s, gym.Space):
                raise ValueError(f"spaces[{k!r}] must be a gymnasium Space, got {type(s).__name__}")
        metadata = {}
        if spaces:
            metadata[SPACES_KEY] = encode_spaces(spaces)
        if episodes:
            metadata[EPISODES_KEY] = msgpack.packb([[float(r), int(n)] for r, n in episodes])
        if env_faults:
            metadata[ENV_FAULTS_KEY] = str(int(env_faults)).encode()
        if normalize_delta:
            metadata[NORMALIZE_KEY] = msgpack.packb(normalize_delta)
        schema = pa.schema(fields, metadata=metadata or None)
        rb = pa.RecordBatch.from_arrays(arrays, schema=schema) if arrays else \
            pa.RecordBatch.from_pylist([], schema=schema)
        self._init(rb, spaces)

    def _init(self, rb: pa.RecordBatch, spaces: dict[str, gym.Space]) -> None:
        self._batch, self._raw, self._schema, self._num_rows = rb, None, rb.schema, rb.num_rows
        self._spaces = spaces
        self._views: dict[str, np.ndarray] = {}

    @property
    def _rb(self) -> pa.RecordBatch:
        if self._batch is None:
            plans, buffers = self._raw
            self._batch = _arrow_from_raw(self._schema, plans, self._num_rows, buffers)
            self._raw = None
        return self._batch

    @classmethod
    def _wrap(cls, rb: pa.RecordBatch, spaces: dict[str, gym.Space] | None = None) -> "SampleBatch":
        self = cls.__new__(cls)
        if spaces is None:
            meta = rb.schema.metadata or {}
            spaces = decode_spaces(meta[SPACES_KEY]) if SPACES_KEY in meta else {}
        self._init(rb, spaces)
        return self

    # ---- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def columns(self) -> list[str]:
        return list(self._schema.names)

    @property
    def spaces(self) -> dict[str, gym.Space]:
        return dict(self._spaces)

    @property
    def episodes(self) -> list[tuple[float, int]]:
        """(return, length) of each episode that finished while this batch was sampled. Kept by
        `with_columns` and merged by `concat`; slices and other row selections drop it."""
        raw = (self._schema.metadata or {}).get(EPISODES_KEY)
        if not raw:
            return []
        try:
            return [(float(r), int(n)) for r, n in msgpack.unpackb(raw)]
        except Exception as e:
            raise ValueError(f"malformed episode metadata: {e}") from None

    @property
    def env_faults(self) -> int:
        """Sub-envs that raised and were made anew while this batch was sampled (their unfinished
        episodes are not in it). Kept and merged like `episodes`."""
        raw = (self._schema.metadata or {}).get(ENV_FAULTS_KEY)
        return int(raw) if raw else 0

    @property
    def normalize_delta(self) -> dict[str, list] | None:
        """What the normalize preset's statistics gained while this batch was sampled (None
        without it); the driver merges it into the statistics it sends the workers. Kept and
        merged like `episodes`."""
        raw = (self._schema.metadata or {}).get(NORMALIZE_KEY)
        return msgpack.unpackb(raw) if raw else None

    @property
    def nbytes(self) -> int:
        if self._batch is None:
            return sum(memoryview(buf).nbytes for buf in self._raw[1])
        return self._batch.nbytes

    def __iter__(self) -> Iterator[str]:
        return iter(self._schema.names)

    def __contains__(self, name: object) -> bool:
        return name in self._schema.names

    def __getitem__(self, key):
        if isinstance(key, str):
            view = self._views.get(key)
            if view is None:
                try:
                    index = self._schema.get_field_index(key)
                except KeyError:
                    index = -1
                if index < 0:
                    raise KeyError(f"no column {key!r}; columns are {self.columns}") from None
                if self._batch is None:  # straight from the raw buffer
                    plan = self._raw[0][index]
                    view = np.frombuffer(self._raw[1][index], dtype=plan.dtype).reshape(self._num_rows, *plan.shape)
                    view.flags.writeable = False
                else:
                    view = _column_view(self._batch.column(index), self._schema.field(index))
                self._views[key] = view
            return view
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("SampleBatch slices must be contiguous (step 1); use take() to gather rows")
            return self._rows(self._rb.slice(start, max(stop - start, 0)))
        raise TypeError(f"SampleBatch indices must be a column name or a slice, got {type(key).__name__}")

    def get(self, key, default=None):
        return self[key] if key in self else default

    def take(self, indices: Sequence[int] | np.ndarray) -> "SampleBatch":
        """A new batch with the given rows, in the given order (a copy)."""
        idx = pa.array(np.asarray(indices, dtype=np.int64))
        return self._rows(self._rb.take(idx))

    def _rows(self, rb: pa.RecordBatch) -> "SampleBatch":
        # The episode summary describes the sampled batch as a whole, not a selection of rows
        # (concatenating slices would otherwise count each episode again).
        meta = rb.schema.metadata
        if meta and any(key in meta for key in SUMMARY_KEYS):
            rb = rb.replace_schema_metadata({k: v for k, v in meta.items() if k not in SUMMARY_KEYS})
        return SampleBatch._wrap(rb, self._spaces)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleBatch):
            return NotImplemented
        if self.columns != other.columns or len(self) != len(other) or self._spaces != other._spaces \
                or self.episodes != other.episodes or self.env_faults != other.env_faults:
            return False
        for name in self.columns:
            a, b = self[name], other[name]
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True

    __hash__ = None  # mutable-looking containers should not be hashable

    def __repr__(self) -> str:
        lines = [f"SampleBatch({len(self)} rows"]
        for name in self.columns:
            lines.append(f"  {name!r}: {_summary(self[name])}")
        if self._spaces:
            lines.append(f"  spaces: {self._spaces}")
        return ",\n".join(lines) + ")"

    # ---- new batches from old ones ----------------------------------------------------------
    def with_columns(self, **columns: Any) -> "SampleBatch":
        """A new batch with these columns added or replaced; the others are shared, not copied."""
        arrays = dict(zip(self._rb.schema.names, self._rb.columns))
        fields = {f.name: f for f in self._rb.schema}
        for name, value in columns.items():
            arr = _check_column(name, value, len(self) if self.columns else None)
            column, meta = _to_arrow_column(arr)
            arrays[name] = column
            fields[name] = pa.field(name, column.type, nullable=False, metadata=meta)
        schema = pa.schema([fields[n] for n in arrays], metadata=self._rb.schema.metadata)
        return SampleBatch._wrap(pa.RecordBatch.from_arrays(list(arrays.values()), schema=schema), self._spaces)

    def select(self, names: Sequence[str]) -> "SampleBatch":
        missing = [n for n in names if n not in self]
        if missing:
            raise KeyError(f"no columns {missing}; columns are {self.columns}")
        return SampleBatch._wrap(self._rb.select(list(names)), self._spaces)

    @staticmethod
    def concat(batches: Sequence["SampleBatch"]) -> "SampleBatch":
        """One batch with the rows of all `batches`, in order. Columns must match."""
        batches = list(batches)
        if not batches:
            return SampleBatch()
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        for i, b in enumerate(batches[1:], start=1):
            if b.columns != first.columns:
                raise ValueError(f"cannot concat: batch {i} has columns {b.columns}, batch 0 has {first.columns}")
            for name in first.columns:
                a, c = first[name], b[name]
                if a.dtype != c.dtype or a.shape[1:] != c.shape[1:]:
                    raise ValueError(f"cannot concat: column {name!r} is {c.dtype}{list(c.shape[1:])} in batch {i}"
                                     f" but {a.dtype}{list(a.shape[1:])} in batch 0")
        columns = {name: np.concatenate([b[name] for b in batches]) for name in first.columns}
        from flowrl.normalize import merge_deltas

        return SampleBatch(columns, first._spaces, [e for b in batches for e in b.episodes],
                           sum(b.env_faults for b in batches), merge_deltas([b.normalize_delta for b in batches]))

    def split_by_episode(self) -> list["SampleBatch"]:
        """Contiguous pieces, each holding rows of exactly one `eps_id`, in order."""
        if "eps_id" not in self:
            raise KeyError(f"split_by_episode needs an 'eps_id' column; columns are {self.columns}")
        eps = self["eps_id"]
        if len(eps) == 0:
            return []
        starts = np.flatnonzero(eps[1:] != eps[:-1]) + 1
        bounds = [0, *starts.tolist(), len(eps)]
        return [self[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def shuffle(self, seed: int | np.random.Generator | None = None) -> "SampleBatch":
        """A new batch with the rows in a random order (a copy)."""
        rng = np.random.default_rng(seed)
        return self.take(rng.permutation(len(self)))

    def minibatches(self, size: int, seed: int | np.random.Generator | None = None,
                    drop_last: bool = False) -> Iterator["SampleBatch"]:
        """One pass over the rows in random order, `size` rows at a time (the last may be smaller
        unless `drop_last`). Every row appears exactly once per pass."""
        if size <= 0:
            raise ValueError(f"minibatch size must be positive, got {size}")
        shuffled = self.shuffle(seed)
        n = len(shuffled)
        for start in range(0, n, size):
            if drop_last and start + size > n:
                return
            yield shuffled[start:start + size]

    # ---- conversions -----------------------------------------------------------------------
    def to_arrow(self) -> pa.RecordBatch:
        return self._rb

    @classmethod
    def from_arrow(cls, data: pa.Table | pa.RecordBatch) -> "SampleBatch":
        """Wrap an Arrow table or record batch (no copy when it is one chunk of supported types)."""
        if isinstance(data, pa.Table):
            names = data.schema.names
            arrays = [_normalize_arrow_column(n, data.column(n), data.schema.field(n)) for n in names]
        elif isinstance(data, pa.RecordBatch):
            names = data.schema.names
            arrays = [_normalize_arrow_column(n, data.column(i), data.schema.field(i)) for i, n in enumerate(names)]
        else:
            raise TypeError(f"from_arrow takes a pyarrow Table or RecordBatch, got {type(data).__name__}")
        fields = [pa.field(n, a.type, nullable=False, metadata=data.schema.field(n).metadata)
                  for n, a in zip(names, arrays)]
        schema = pa.schema(fields, metadata=data.schema.metadata)
        rb = pa.RecordBatch.from_arrays(arrays, schema=schema) if arrays else \
            pa.RecordBatch.from_pylist([], schema=schema)
        return cls._wrap(rb)

    def to_ipc(self) -> pa.Buffer:
        """The batch as an Arrow IPC stream in one buffer."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self._rb.schema) as writer:
            writer.write_batch(self._rb)
        return sink.getvalue()

    @classmethod
    def from_ipc(cls, buf) -> "SampleBatch":
        """Read a batch from an Arrow IPC stream buffer (zero-copy from `buf`)."""
        try:
            reader = pa.ipc.open_stream(pa.py_buffer(buf) if not isinstance(buf, pa.Buffer) else buf)
            batches = list(reader)
            schema = reader.schema
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
            raise ValueError(f"not a valid SampleBatch IPC buffer: {e}") from None
        if not batches:
            return cls.from_arrow(pa.Table.from_batches([], schema=schema))
        if len(batches) == 1:
            return cls.from_arrow(batches[0])
        return cls.from_arrow(pa.Table.from_batches(batches, schema=schema))

    def to_torch(self, device=None) -> dict[str, Any]:
        """A dict of torch tensors. On CPU they share memory with the batch and must not be
        written to; pass `device` to copy them elsewhere."""
        import torch

        out = {}
        with warnings.catch_warnings():
            # The Arrow buffers are read-only; torch warns that it cannot enforce that.
            warnings.simplefilter("ignore", UserWarning)
            for name in self.columns:
                t = torch.from_numpy(self[name])
                out[name] = t.to(device) if device is not None else t
        return out

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {name: self[name] for name in self.columns}

    # ---- pickling: Ray moves the column buffers out of band, with no extra copy -------------
    def __reduce_ex__(self, protocol: int):
        if protocol < 5:
            return _from_ipc_bytes, (self.to_ipc().to_pybytes(),)
        # Each column's values as raw bytes, which pickle may keep out of band; the schema says
        # how to read them back. A numpy view made earlier is the cheapest handle on them;
        # otherwise the Arrow buffer is sliced directly (building a view would cost more).
        if self._batch is None:  # never assembled: send the buffers on as they came
            return _rebuild, (self._schema.serialize().to_pybytes(), self._num_rows,
                              [pickle.PickleBuffer(buf) for buf in self._raw[1]])
        rb, views = self._batch, self._views
        buffers = []
        for name, column in zip(rb.schema.names, rb.columns):
            view = views.get(name)
            if view is not None and view.flags.c_contiguous:
                raw = view.reshape(-1).view(np.uint8) if view.dtype == np.bool_ else view.reshape(-1)
            else:
                raw = _values_buffer(column)
            buffers.append(pickle.PickleBuffer(raw))
        return _rebuild, (rb.schema.serialize().to_pybytes(), rb.num_rows, buffers)
