"""Gymnasium spaces to and from msgpack, so they can travel in Arrow schema metadata.

Never pickle: a dataset or checkpoint read from disk must not be able to run code.

>>> import gymnasium as gym
>>> space = gym.spaces.Dict({"pos": gym.spaces.Box(-1.0, 1.0, (2,)), "n": gym.spaces.Discrete(3)})
>>> decode_space(encode_space(space)) == space
True
"""

from __future__ import annotations

import functools

from typing import Any

import gymnasium as gym
import msgpack
import numpy as np


class SpaceDecodeError(ValueError):
    """A space description that cannot be turned back into a gymnasium space."""


def _array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unarray(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """A plain, msgpack-able description of `space` (Box, Discrete, MultiDiscrete,
    MultiBinary, and Dict/Tuple of those)."""
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "low": _array(space.low), "high": _array(space.high),
                "dtype": np.dtype(space.dtype).str}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": _array(space.nvec), "start": _array(space.start),
                "dtype": np.dtype(space.dtype).str}
    if isinstance(space, gym.spaces.MultiBinary):
        n = space.n if isinstance(space.n, int) else list(space.n)
        return {"type": "MultiBinary", "n": n}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": [[k, space_to_dict(s)] for k, s in space.spaces.items()]}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_dict(s) for s in space.spaces]}
    raise TypeError(f"cannot encode space of type {type(space).__name__}; "
                    "supported: Box, Discrete, MultiDiscrete, MultiBinary, Dict, Tuple")


def space_from_dict(d: dict[str, Any]) -> gym.Space:
    try:
        kind = d["type"]
        if kind == "Box":
            low, high = _unarray(d["low"]), _unarray(d["high"])
            return gym.spaces.Box(low, high, shape=low.shape, dtype=np.dtype(d["dtype"]))
        if kind == "Discrete":
            return gym.spaces.Discrete(d["n"], start=d["start"])
        if kind == "MultiDiscrete":
            return gym.spaces.MultiDiscrete(_unarray(d["nvec"]), dtype=np.dtype(d["dtype"]),
                                            start=_unarray(d["start"]))
        if kind == "MultiBinary":
            return gym.spaces.MultiBinary(d["n"])
        if kind == "Dict":
            return gym.spaces.Dict({k: space_from_dict(s) for k, s in d["spaces"]})
        if kind == "Tuple":
            return gym.spaces.Tuple([space_from_dict(s) for s in d["spaces"]])
    except (KeyError, TypeError, ValueError) as e:
        raise SpaceDecodeError(f"malformed space description: {e}") from None
    raise SpaceDecodeError(f"unknown space type {kind!r}")


def encode_space(space: gym.Space) -> bytes:
    return msgpack.packb(space_to_dict(space), use_bin_type=True)


def decode_space(data: bytes) -> gym.Space:
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise SpaceDecodeError(f"space metadata is not valid msgpack: {e}") from None
    return space_from_dict(d)


_encoded: dict[tuple, tuple[list, bytes]] = {}


def encode_spaces(spaces: dict[str, gym.Space]) -> bytes:
    # Batches are built many times over with the same space objects: encode each set once.
    key = tuple((k, id(s)) for k, s in spaces.items())
    hit = _encoded.get(key)
    if hit is not None:
        return hit[1]
    data = msgpack.packb({k: space_to_dict(s) for k, s in spaces.items()}, use_bin_type=True)
    if len(_encoded) >= 256:
        _encoded.clear()
    _encoded[key] = (list(spaces.values()), data)  # holding the spaces keeps their ids unique
    return data


def decode_spaces(data: bytes) -> dict[str, gym.Space]:
    """The spaces in `data`. Batches received from other processes carry the same few
    encodings over and over: each is decoded once (the dict is new, the spaces are shared)."""
    return dict(_decode_spaces(bytes(data)))


@functools.lru_cache(maxsize=256)
def _decode_spaces(data: bytes) -> dict[str, gym.Space]:
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise SpaceDecodeError(f"space metadata is not valid msgpack: {e}") from None
    if not isinstance(d, dict):
        raise SpaceDecodeError("space metadata must be a map of column name to space")
    return {k: space_from_dict(s) for k, s in d.items()}


def space_from_spec(spec: Any) -> gym.Space:
    """A space from the plain form a plan file gives (YAML), e.g. `{type: Box, low: -1, high: 1,
    shape: [4]}`, `{type: Discrete, n: 2}`, `{type: MultiDiscrete, nvec: [3, 2]}`,
    `{type: MultiBinary, n: 4}`, `{type: Dict, spaces: {name: spec, ...}}`, `{type: Tuple,
    spaces: [spec, ...]}`; ValueError saying what is wrong.

    >>> space_from_spec({"type": "Box", "low": -1.0, "high": 1.0, "shape": [2]})
    Box(-1.0, 1.0, (2,), float32)
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a space is a mapping with a type (Box, Discrete, MultiDiscrete, MultiBinary, Dict, "
                         f"Tuple), got {spec!r}")
    kind = spec["type"]
    keys = {"Box": {"low", "high", "shape", "dtype"}, "Discrete": {"n", "start"}, "MultiDiscrete": {"nvec"},
            "MultiBinary": {"n"}, "Dict": {"spaces"}, "Tuple": {"spaces"}}
    if kind not in keys:
        raise ValueError(f"unknown space type {kind!r} (one of {', '.join(keys)})")
    unknown = set(spec) - keys[kind] - {"type"}
    if unknown:
        raise ValueError(f"{kind}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(keys[kind]))})")
    try:
        if kind == "Box":
            shape, dtype = spec.get("shape"), np.dtype(spec.get("dtype", "float32"))
            low, high = (np.asarray(spec.get(k, default), dtype=dtype) for k, default in (("low", -np.inf),
                                                                                        ("high", np.inf)))
            return gym.spaces.Box(low.item() if low.ndim == 0 else low, high.item() if high.ndim == 0 else high,
                                  shape=tuple(shape) if shape is not None else None, dtype=dtype)
        if kind == "Discrete":
            return gym.spaces.Discrete(int(spec["n"]), start=int(spec.get("start", 0)))
        if kind == "MultiDiscrete":
            return gym.spaces.MultiDiscrete(np.asarray(spec["nvec"], dtype=np.int64))
        if kind == "MultiBinary":
            return gym.spaces.MultiBinary(spec["n"])
        if kind == "Dict":
            if not isinstance(spec["spaces"], dict):
                raise ValueError("Dict: spaces must be a mapping of names to spaces")
            return gym.spaces.Dict({str(k): space_from_spec(s) for k, s in spec["spaces"].items()})
        if not isinstance(spec["spaces"], list):
            raise ValueError("Tuple: spaces must be a list of spaces")
        return gym.spaces.Tuple([space_from_spec(s) for s in spec["spaces"]])
    except KeyError as e:
        raise ValueError(f"{kind}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, AssertionError) as e:
        raise ValueError(f"{kind}: {e}") from None


def obs_row_layout(space: gym.Space) -> tuple[tuple[int, ...], np.dtype]:
    """The per-row shape and dtype a rollout worker gives observations of `space` (see
    flowrl.policy.obs_to_array): Box as it is (uint8 images stay uint8), the rest flattened."""
    if isinstance(space, gym.spaces.Box):
        return tuple(space.shape), np.dtype(space.dtype)
    return (int(gym.spaces.flatdim(space)),), np.dtype(np.float32)


def action_row_layout(space: gym.Space) -> tuple[tuple[int, ...], np.dtype]:
    """The per-row shape and dtype of sampled actions (see TorchPolicy.compute_actions)."""
    if isinstance(space, gym.spaces.Discrete):
        return (), np.dtype(np.int64)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return tuple(space.shape), np.dtype(np.int64)
    if isinstance(space, gym.spaces.Box):
        return tuple(space.shape), np.dtype(np.float32)
    return (int(gym.spaces.flatdim(space)),), np.dtype(np.float32)
