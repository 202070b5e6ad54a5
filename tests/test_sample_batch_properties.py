"""Property tests: every round trip and every split gives back the original batch."""

import pickle

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrl import SampleBatch
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
