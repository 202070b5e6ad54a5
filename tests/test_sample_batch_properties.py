"""Property tests: every round trip and every split gives back the original batch."""

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrl import SampleBatch
from flowrl.sample_batch import BatchLayout, arrow_to_numpy
from tests.strategies import batches, columns, spaces
from flowrl.spaces import decode_space, encode_space


@given(batches())
def test_ipc_round_trip_equals_original(batch):
    back = SampleBatch.from_ipc(batch.to_ipc())
    assert back == batch
    for name in batch.columns:
        assert back[name].dtype == batch[name].dtype and back[name].shape == batch[name].shape
    assert back.spaces == batch.spaces


@given(batches())
def test_pickle_round_trip_both_protocols(batch):
    for protocol in (4, 5):
        assert pickle.loads(pickle.dumps(batch, protocol=protocol)) == batch


@given(batches(min_rows=1), st.data())
def test_pickled_slices_equal_the_slice_with_or_without_cached_views(batch, data):
    # A slice starts at an offset into the column buffers: pickling must send only its bytes,
    # whether the bytes come from a cached numpy view or straight from Arrow.
    start = data.draw(st.integers(0, len(batch)))
    stop = data.draw(st.integers(start, len(batch)))
    piece = batch[start:stop]
    fresh = pickle.loads(pickle.dumps(piece, protocol=5))
    assert fresh == piece  # __eq__ made numpy views of every column of `piece`
    assert pickle.loads(pickle.dumps(piece, protocol=5)) == piece
    assert pickle.loads(pickle.dumps(fresh[0:len(fresh)], protocol=5)) == piece
    # An unpickled batch keeps raw buffers until an Arrow operation needs the record batch.
    raw = pickle.loads(pickle.dumps(piece, protocol=5))
    assert len(raw) == len(piece) and raw.columns == piece.columns and raw.nbytes == piece.nbytes
    assert pickle.loads(pickle.dumps(raw, protocol=5)) == piece  # passed on without assembling
    assert SampleBatch.from_ipc(raw.to_ipc()) == piece
    assert SampleBatch.concat([raw, piece]) == SampleBatch.concat([piece, piece])


@given(spaces)
def test_space_codec_round_trip(space):
    assert decode_space(encode_space(space)) == space


@given(batches(min_rows=1), st.data())
def test_concat_of_any_split_equals_original(batch, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(batch)), max_size=5)))
    bounds = [0, *cuts, len(batch)]
    pieces = [batch[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    assert sum(len(p) for p in pieces) == len(batch)
    assert SampleBatch.concat(pieces) == batch


@given(batches(min_rows=1))
def test_split_by_episode_then_concat_equals_original(batch):
    pieces = batch.split_by_episode()
    for piece in pieces:
        assert len(np.unique(piece["eps_id"])) == 1
    for left, right in zip(pieces[:-1], pieces[1:]):
        assert left["eps_id"][-1] != right["eps_id"][0]
    assert SampleBatch.concat(pieces) == batch


@given(columns(min_rows=1), st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_minibatches_cover_every_row_once(cols, size, seed):
    cols["row"] = np.arange(len(cols["eps_id"]))
    batch = SampleBatch(cols)
    seen = np.concatenate([mb["row"] for mb in batch.minibatches(size, seed=seed)])
    assert sorted(seen.tolist()) == list(range(len(batch)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches())
def test_ray_round_trip_equals_original(ray_session, batch):
    assert ray_session.get(ray_session.put(batch)) == batch


@given(batches(min_rows=1), st.data())
def test_batch_layout_batches_equal_sample_batches_of_the_same_rows(batch, data):
    # BatchLayout skips SampleBatch's per-batch conversion; whatever it builds must behave the
    # same: equal columns and spaces, the same Arrow record batch, pickling, slicing, concat.
    layout = BatchLayout(batch.to_numpy(), batch.spaces)
    size = data.draw(st.integers(1, len(batch)))
    pieces = list(layout.batches(batch.to_numpy(), size))
    assert [len(p) for p in pieces] == [min(size, len(batch) - s) for s in range(0, len(batch), size)]
    assert SampleBatch.concat(pieces) == batch
    for start, piece in zip(range(0, len(batch), size), pieces):
        expected = batch[start:start + size]
        assert piece == expected and piece.nbytes == expected.nbytes
        assert pickle.loads(pickle.dumps(piece, protocol=5)) == expected
        arrow = piece.to_arrow()  # assembled from the raw columns
        assert arrow.schema.equals(expected.to_arrow().schema, check_metadata=True)
        assert SampleBatch.from_arrow(arrow) == expected
        assert piece[0:len(piece)] == expected


@given(batches(min_rows=1))
def test_batch_layout_refuses_columns_of_another_layout(batch):
    layout = BatchLayout(batch.to_numpy(), batch.spaces)
    cols = batch.to_numpy()
    name = next(iter(cols))
    with pytest.raises(ValueError, match="do not match"):
        layout.batch(dict(reversed(cols.items())) if len(cols) > 1 else {"other": cols[name]})
    wrong = dict(cols)
    wrong[name] = np.zeros(cols[name].shape, np.complex64)  # a dtype no layout has
    with pytest.raises(ValueError, match=repr(name)):
        layout.batch(wrong)


@given(batches(), st.integers(1, 4))
def test_arrow_to_numpy_reads_like_a_sample_batch(batch, pieces):
    # Also through a table of several chunks and with the tensor type dropped (plain
    # fixed-size lists, as some writers leave them) and booleans bit-packed.
    table = pa.Table.from_batches([batch.to_arrow()])
    assert _columns_equal(arrow_to_numpy(table), batch.to_numpy())
    cuts = np.linspace(0, len(batch), pieces + 1).astype(int)
    chunked = pa.Table.from_batches([batch.to_arrow().slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])])
    assert _columns_equal(arrow_to_numpy(chunked), batch.to_numpy())
    plain = {}
    for name, value in batch.to_numpy().items():
        column = pa.array(value.reshape(-1))  # numbers; booleans bit-packed
        for size in reversed(value.shape[1:]):
            column = pa.FixedSizeListArray.from_arrays(column, size)
        plain[name] = column
    assert _columns_equal(arrow_to_numpy(pa.table(plain)), batch.to_numpy())


def _columns_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and np.array_equal(a[k], b[k], equal_nan=b[k].dtype.kind == "f") for k in b)
