"""Exact-answer and error tests for each SampleBatch method."""

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pytest
import torch

from flowrl import SampleBatch


def small():
    return SampleBatch(
        {"obs": np.arange(12, dtype=np.float32).reshape(6, 2),
         "actions": np.array([0, 1, 1, 0, 1, 0], dtype=np.int64),
         "rewards": np.array([1.0, 1.0, 0.5, 1.0, 1.0, 2.0], dtype=np.float32),
         "terminateds": np.array([False, True, False, False, True, False]),
         "eps_id": np.array([7, 7, 8, 8, 8, 9])},
        spaces={"obs": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32), "actions": gym.spaces.Discrete(2)})


def test_columns_len_and_dtypes():
    b = small()
    assert len(b) == 6 and b.columns == ["obs", "actions", "rewards", "terminateds", "eps_id"]
    assert b["obs"].dtype == np.float32 and b["obs"].shape == (6, 2)
    assert b["terminateds"].dtype == np.bool_
    assert b["terminateds"].tolist() == [False, True, False, False, True, False]


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                                   np.float16, np.float32, np.float64])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 2)])
def test_dtype_and_shape_are_kept(dtype, trailing):
    data = (np.arange(4 * int(np.prod(trailing, dtype=int))) % 2).astype(dtype).reshape(4, *trailing)
    b = SampleBatch({"x": data})
    assert b["x"].dtype == dtype and b["x"].shape == (4, *trailing)
    np.testing.assert_array_equal(b["x"], data)


def test_column_is_a_read_only_view_of_the_arrow_buffer():
    b = small()
    for name in ("obs", "rewards", "terminateds"):
        view = b[name]
        assert not view.flags.writeable
        buffers = [buf for buf in b.to_arrow().column(b.columns.index(name)).buffers() if buf is not None]
        if name == "obs":  # a tensor column keeps its values in the child array's buffer
            buffers = [buf for buf in b.to_arrow().column(0).storage.flatten().buffers() if buf is not None]
        assert any(view.ctypes.data == buf.address for buf in buffers)
        with pytest.raises(ValueError):
            view[0] = 1


def test_tensor_column_is_arrow_fixed_shape_tensor():
    t = small().to_arrow().schema.field("obs").type
    assert isinstance(t, pa.FixedShapeTensorType) and t.shape == [2]


@pytest.mark.parametrize("cols, match", [
    ({"a": [[1, 2], [3]]}, "'a'"),
    ({"a": np.array([{}, 1], dtype=object)}, "'a'.*object"),
    ({"a": np.zeros(3), "b": np.zeros(4)}, "'b' has 4 rows"),
    ({"a": np.array(["x", "y"])}, "'a'.*not supported"),
    ({"a": np.float32(1.0)}, "'a'.*scalar"),
    ({"a": np.zeros((2, 0))}, "'a'.*non-zero"),
])
def test_bad_columns_raise_value_error_naming_the_column(cols, match):
    with pytest.raises(ValueError, match=match):
        SampleBatch(cols)


def test_slice_is_zero_copy_and_exact():
    b = small()
    s = b[2:5]
    assert len(s) == 3 and s["eps_id"].tolist() == [8, 8, 8]
    assert np.shares_memory(s["obs"], b["obs"])
    assert s["obs"].tolist() == [[4, 5], [6, 7], [8, 9]]
    assert len(b[5:100]) == 1 and len(b[4:2]) == 0
    with pytest.raises(ValueError, match="contiguous"):
        b[::2]


def test_missing_column_names_it():
    with pytest.raises(KeyError, match="'advantages'"):
        small()["advantages"]


def test_concat_exact_and_mismatch_errors():
    b = small()
    c = SampleBatch.concat([b[:2], b[2:3], b[3:]])
    assert c == b
    with pytest.raises(ValueError, match="columns"):
        SampleBatch.concat([b, b.select(["obs"])])
    other = b.with_columns(rewards=b["rewards"].astype(np.float64))
    with pytest.raises(ValueError, match="'rewards'"):
        SampleBatch.concat([b, other])


def test_split_by_episode_exact():
    pieces = small().split_by_episode()
    assert [p["eps_id"].tolist() for p in pieces] == [[7, 7], [8, 8, 8], [9]]
    with pytest.raises(KeyError, match="eps_id"):
        small().select(["obs"]).split_by_episode()


def test_shuffle_is_a_seeded_permutation():
    b = small()
    s1, s2 = b.shuffle(3), b.shuffle(3)
    assert s1 == s2
    assert sorted(s1["obs"][:, 0].tolist()) == sorted(b["obs"][:, 0].tolist())
    order = np.random.default_rng(3).permutation(6)
    assert s1["actions"].tolist() == b["actions"][order].tolist()


def test_minibatches_sizes_and_drop_last():
    b = small()
    assert [len(m) for m in b.minibatches(4, seed=0)] == [4, 2]
    assert [len(m) for m in b.minibatches(4, seed=0, drop_last=True)] == [4]
    with pytest.raises(ValueError):
        list(b.minibatches(0))


def test_with_columns_returns_new_batch_and_shares_the_rest():
    b = small()
    c = b.with_columns(advantages=torch.arange(6, dtype=torch.float32), rewards=np.zeros(6, np.float32))
    assert "advantages" not in b and c["advantages"].tolist() == [0, 1, 2, 3, 4, 5]
    assert b["rewards"][0] == 1.0 and c["rewards"][0] == 0.0
    assert np.shares_memory(c["obs"], b["obs"])
    assert c.spaces == b.spaces
    with pytest.raises(ValueError, match="'advantages' has 5 rows"):
        b.with_columns(advantages=np.zeros(5))


def test_to_torch_shares_memory():
    b = small()
    t = b.to_torch()
    assert t["obs"].dtype == torch.float32 and t["terminateds"].dtype == torch.bool
    assert t["obs"].data_ptr() == b["obs"].ctypes.data
    assert t["actions"].tolist() == [0, 1, 1, 0, 1, 0]


def test_arrow_round_trip_and_foreign_tables():
    b = small()
    assert SampleBatch.from_arrow(b.to_arrow()) == b
    assert SampleBatch.from_arrow(pa.Table.from_batches([b.to_arrow()])) == b
    # Tables written by other tools: plain bools, nested fixed-size lists, several chunks.
    t = pa.table({"done": pa.array([True, False]),
                  "obs": pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32(), 2))})
    t = pa.concat_tables([t, t])
    c = SampleBatch.from_arrow(t)
    assert c["done"].tolist() == [True, False, True, False]
    assert c["obs"].shape == (4, 2) and c["obs"].dtype == np.float32
    with pytest.raises(ValueError, match="'x'.*null"):
        SampleBatch.from_arrow(pa.table({"x": pa.array([1, None])}))
    with pytest.raises(ValueError, match="'s'"):
        SampleBatch.from_arrow(pa.table({"s": pa.array(["a"])}))


def test_ipc_round_trip_keeps_spaces_and_rejects_garbage():
    b = small()
    back = SampleBatch.from_ipc(b.to_ipc())
    assert back == b and back.spaces["actions"] == gym.spaces.Discrete(2)
    assert SampleBatch.from_ipc(bytes(b.to_ipc())) == b
    with pytest.raises(ValueError, match="IPC"):
        SampleBatch.from_ipc(b"not arrow at all")


def test_spaces_metadata_is_msgpack_not_pickle():
    import msgpack
    meta = small().to_arrow().schema.metadata[b"flowrl.spaces"]
    decoded = msgpack.unpackb(meta, raw=False)
    assert decoded["actions"] == {"type": "Discrete", "n": 2, "start": 0}


def test_repr_summarizes_columns_like_rllib():
    text = repr(small())
    assert "SampleBatch(6 rows" in text
    assert "'rewards': np.ndarray((6,), dtype=float32, min=0.5, max=2, mean=1.083)" in text


def test_empty_batch():
    b = SampleBatch()
    assert len(b) == 0 and b.columns == [] and SampleBatch.concat([]) == b
    assert SampleBatch.from_ipc(b.to_ipc()) == b


def test_ray_put_get_and_actor_round_trip(ray_session):
    ray = ray_session

    @ray.remote
    class Echo:
        def echo(self, batch):
            assert isinstance(batch, SampleBatch)
            return batch.with_columns(seen=np.ones(len(batch), dtype=np.int8))

    b = small()
    assert ray.get(ray.put(b)) == b
    echo = Echo.remote()
    back = ray.get(echo.echo.remote(b))
    assert back.select(b.columns) == b and back["seen"].tolist() == [1] * 6
    ray.kill(echo)


def test_episodes_travel_with_the_batch_and_merge_on_concat():
    b = SampleBatch({"x": np.arange(4)}, episodes=[(10.0, 5), (3.5, 2)])
    assert b.episodes == [(10.0, 5), (3.5, 2)]
    assert SampleBatch.from_ipc(b.to_ipc()).episodes == b.episodes
    assert b.with_columns(y=np.zeros(4)).episodes == b.episodes
    assert b[0:2].episodes == [] and b.shuffle(0).episodes == []
    c = SampleBatch({"x": np.arange(2)}, episodes=[(1.0, 1)])
    assert SampleBatch.concat([b, c]).episodes == [(10.0, 5), (3.5, 2), (1.0, 1)]
