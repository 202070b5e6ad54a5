"""Reads numpy arrays out of RLlib's packed columns without unpickling them.

RLlib's JSON writer packs columns as base64(lz4(cloudpickle.dumps(array))). Unpickling data
from disk runs whatever code the file names, so flowrl never does it. Instead this module
interprets the few pickle opcodes a numpy array needs (strings, bytes, numbers, tuples and
three allow-listed numpy constructors) and refuses anything else.

>>> import pickle, numpy as np
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> bool((load_array(pickle.dumps(a, protocol=5)) == a).all()), load_array(pickle.dumps(a, protocol=2)).shape
(True, (2, 3))
>>> import os
>>> load_array(pickle.dumps(os.getcwd))
Traceback (most recent call last):
...
flowrl.connectors.safe_unpack.UnsafePickleError: refusing to load posix.getcwd: only numpy arrays are read from packed columns
"""

from __future__ import annotations

import pickletools
import struct

import numpy as np


class UnsafePickleError(ValueError):
    """The pickle holds something other than a plain numpy array."""


_NUMPY_MODULES = ("numpy", "numpy.core.numeric", "numpy._core.numeric", "numpy.core.multiarray",
                  "numpy._core.multiarray")
_ALLOWED = {"_frombuffer", "_reconstruct", "ndarray", "dtype", "scalar"}


class _Global:
    def __init__(self, name: str):
        self.name = name


class _Dtype:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class _Pending:
    """An ndarray from _reconstruct, filled in by BUILD."""
    array: np.ndarray | None = None


def _dtype(spec) -> np.dtype:
    if not isinstance(spec, str):
        raise UnsafePickleError(f"unexpected dtype argument {spec!r}")
    dt = np.dtype(spec)
    if dt.hasobject:
        raise UnsafePickleError("object arrays are not read from packed columns")
    return dt


def _unwrap(value):
    if isinstance(value, _Dtype):
        return value.dtype
    if isinstance(value, _Pending):
        return value.array
    return value


def _call(fn: _Global, args: tuple):
    if fn.name == "dtype":
        return _Dtype(_dtype(args[0]))
    if fn.name == "_frombuffer":  # (buffer, dtype, shape, order)
        buf, dtype, shape, order = args
        return np.frombuffer(bytes(buf), dtype=_unwrap(dtype)).reshape(shape, order=order).copy()
    if fn.name == "encode":
        text, encoding = args
        if not isinstance(text, str) or encoding != "latin1":
            raise UnsafePickleError("unexpected _codecs.encode call")
        return text.encode("latin-1")
    if fn.name == "_reconstruct":
        return _Pending()
    if fn.name == "scalar":  # a numpy scalar: (dtype, raw bytes)
        dtype, raw = args
        return np.frombuffer(bytes(raw), dtype=_unwrap(dtype))[0]
    raise UnsafePickleError(f"{fn.name} cannot be called")


def _build(target, state):
    if isinstance(target, _Dtype):  # (version, byteorder, ...)
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order in "<>":
            target.dtype = target.dtype.newbyteorder(order)
        return target
    if isinstance(target, _Pending):  # (version, shape, dtype, is_fortran, raw bytes)
        _, shape, dtype, fortran, raw = state
        dtype = _unwrap(dtype)
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError("array data is not raw bytes")
        target.array = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()
        return target
    raise UnsafePickleError("unexpected BUILD")


def load_array(data: bytes) -> np.ndarray:
    """The numpy array pickled in `data`; UnsafePickleError for anything else."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            break
        if name in ("GLOBAL", "STACK_GLOBAL"):
            module, attr = arg.split(" ", 1) if name == "GLOBAL" else (stack.pop(-2), stack.pop())
            if (module, attr) == ("_codecs", "encode"):  # how protocols < 3 spell bytes
                stack.append(_Global("encode"))
                continue
            if module not in _NUMPY_MODULES or attr not in _ALLOWED:
                raise UnsafePickleError(f"refusing to load {module}.{attr}: only numpy arrays are read from "
                                        "packed columns")
            stack.append(_Global(attr))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                      "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8", "BININT", "BININT1",
                      "BININT2", "LONG1", "LONG4", "BINFLOAT", "INT", "LONG", "FLOAT"):
            stack.append(arg.encode("latin-1") if name in ("SHORT_BINSTRING", "BINSTRING") else arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("MEMOIZE",):
            memo[len(memo)] = stack[-1]
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[int(arg)])
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            start = marks.pop()
            items = tuple(stack[start:])
            del stack[start:]
            stack.append(items)
        elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            k = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
            items = tuple(stack[len(stack) - k:]) if k else ()
            del stack[len(stack) - k:]
            stack.append(items)
        elif name == "REDUCE":
            args = stack.pop()
            fn = stack.pop()
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise UnsafePickleError("unexpected REDUCE")
            stack.append(_call(fn, args))
        elif name == "BUILD":
            state = stack.pop()
            stack.append(_build(stack.pop(), state))
        else:
            raise UnsafePickleError(f"pickle opcode {name} is not allowed in packed columns")
    if len(stack) != 1:
        raise UnsafePickleError("malformed pickle")
    result = _unwrap(stack[0])
    if not isinstance(result, np.ndarray):
        raise UnsafePickleError(f"expected a numpy array, found {type(result).__name__}")
    return result


def unpack_column(text: str) -> np.ndarray:
    """RLlib's `unpack`: base64, then lz4 frame, then the pickled array (read safely)."""
    import base64

    try:
        import lz4.frame
    except ImportError:
        raise UnsafePickleError("packed (compressed) columns need the lz4 package: pip install lz4") from None
    try:
        raw = lz4.frame.decompress(base64.b64decode(text))
    except (ValueError, RuntimeError, struct.error) as e:
        raise UnsafePickleError(f"not an lz4-compressed packed column ({e})") from None
    return load_array(raw)
