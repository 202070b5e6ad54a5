"""hypothesis strategies for SampleBatches and spaces, shared by the property tests."""

import gymnasium as gym
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowrl import SampleBatch

DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64,
          np.float16, np.float32, np.float64]


@st.composite
def columns(draw, min_rows=0, max_rows=40):
    rows = draw(st.integers(min_rows, max_rows))
    names = draw(st.lists(st.sampled_from(["obs", "actions", "rewards", "new_obs", "terminateds", "vf_preds"]),
                          min_size=1, max_size=5, unique=True))
    cols = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        trailing = draw(st.lists(st.integers(1, 3), max_size=2))
        cols[name] = draw(hnp.arrays(dtype, (rows, *trailing)))
    eps_lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=rows or 1))
    cols["eps_id"] = np.repeat(np.arange(len(eps_lengths), dtype=np.int64), eps_lengths)[:rows]
    if len(cols["eps_id"]) < rows:
        cols["eps_id"] = np.concatenate([cols["eps_id"], np.full(rows - len(cols["eps_id"]), len(eps_lengths))])
    return cols


leaf_spaces = st.one_of(
    st.builds(lambda n, s: gym.spaces.Discrete(n, start=s), st.integers(1, 10), st.integers(-3, 3)),
    st.builds(lambda shape, lo: gym.spaces.Box(lo, lo + 1.0, shape=tuple(shape), dtype=np.float32),
              st.lists(st.integers(1, 3), min_size=1, max_size=3), st.floats(-5, 5, width=32)),
    st.builds(lambda nvec: gym.spaces.MultiDiscrete(nvec), st.lists(st.integers(1, 5), min_size=1, max_size=4)),
    st.builds(gym.spaces.MultiBinary, st.integers(1, 6)),
)
spaces = st.recursive(
    leaf_spaces,
    lambda inner: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), inner, min_size=1, max_size=3).map(gym.spaces.Dict),
        st.lists(inner, min_size=1, max_size=3).map(gym.spaces.Tuple)),
    max_leaves=5,
)


@st.composite
def batches(draw, min_rows=0, max_rows=40):
    cols = draw(columns(min_rows, max_rows))
    space_map = draw(st.dictionaries(st.sampled_from(list(cols)), spaces, max_size=2))
    return SampleBatch(cols, space_map)
