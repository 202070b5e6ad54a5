"""The wire format that flowrl's servers and clients speak: the policy server a plan trains
from (`config: {input: external}`, flowrl.connectors.external), `flowrl.client.PolicyClient`,
and `flowrl serve` / the Ray Serve deployment (flowrl.serve).

- HTTP/1.1, `POST` only, keep-alive. Every request carries `Authorization: Bearer <token>`.
- Bodies are msgpack maps (`Content-Type: application/msgpack`) or JSON objects
  (`application/json`); the answer comes in the same encoding. Every body has `"v": 1`, the
  version of this format; a server refuses other versions.
- An array is `{"dtype": "<f4", "shape": [4], "data": <raw little-endian bytes>}` (msgpack
  only) or nested lists of numbers; a Discrete value is an integer, a Dict a map, a Tuple a
  list. Observations and actions are checked against the spaces: the shape, a dtype that casts
  to the space's without loss of kind (raw arrays: exactly the space's dtype), finite numbers,
  Discrete values in range.
- Experience sent in bulk (`/experience`) is an Arrow IPC stream in the msgpack field `rows`.
- Errors are a 4xx or 5xx status with one line of plain text saying why.

Nothing received is unpickled or evaluated: msgpack is read with limits on every length and
without extension types, Arrow IPC is validated in full, arrays are built from raw bytes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np

WIRE_VERSION = 1
MSGPACK = "application/msgpack"
JSON = "application/json"
DEFAULT_MAX_BODY_BYTES = 8 << 20
MAX_ARRAY_LEN = 1 << 20   # elements of one msgpack/JSON list
MAX_MAP_LEN = 4096
MAX_STR_LEN = 1 << 16


class WireError(Exception):
    """A request that cannot be served: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{status}: {self.reason}")


# ---- bodies --------------------------------------------------------------------------------------
def media_type(content_type: str | None) -> str:
    """MSGPACK or JSON from a Content-Type header (parameters ignored); WireError 415 otherwise."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in (MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
        return MSGPACK
    if kind == JSON:
        return JSON
    raise WireError(415, f"Content-Type must be {MSGPACK} or {JSON}, got {content_type or 'none'!r}")


def decode_body(body: bytes, kind: str) -> dict[str, Any]:
    """The request map, its version checked. msgpack is read with limits and no extension types."""
    try:
        if kind == MSGPACK:
            data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, max_bin_len=len(body),
                                   max_str_len=MAX_STR_LEN, max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
                                   max_ext_len=0)
        else:
            data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except WireError:
        raise
    except Exception as e:  # msgpack and json raise several unrelated types on garbage
        raise WireError(400, f"body is not valid {'msgpack' if kind == MSGPACK else 'JSON'} "
                             f"({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise WireError(400, f"body must be a map, got {type(data).__name__}")
    version = data.get("v")
    if version is None:
        raise WireError(400, f"body has no version field \"v\" (this server speaks {WIRE_VERSION})")
    if version != WIRE_VERSION:
        raise WireError(400, f"unsupported wire version {version!r} (this server speaks {WIRE_VERSION})")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def encode_body(data: Mapping[str, Any], kind: str) -> bytes:
    data = {"v": WIRE_VERSION, **data}
    if kind == MSGPACK:
        return msgpack.packb(data, use_bin_type=True)
    return json.dumps(data, separators=(",", ":")).encode()


def field(request: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
    """request[name], of one of `kinds` (bool is never an int here); WireError 400 otherwise."""
    if name not in request:
        if default is ...:
            raise WireError(400, f"missing field {name!r}")
        return default
    value = request[name]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise WireError(400, f"field {name!r} must be {_kind_names(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise WireError(400, f"field {name!r} must be {_kind_names(kinds)}, got {type(value).__name__}")
    return value


def _kind_names(kinds) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a map",
             list: "a list", bytes: "binary"}
    return " or ".join(names.get(k, k.__name__) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def reward_field(request: Mapping[str, Any], name: str = "reward") -> float:
    value = float(field(request, name, (int, float), 0.0))
    if not np.isfinite(value):
        raise WireError(400, f"field {name!r} must be finite, got {value}")
    return value


# ---- arrays and spaces ---------------------------------------------------------------------------
def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def decode_array(value: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """An array of exactly `shape`, as `dtype`, from a raw array map or nested lists."""
    dtype = np.dtype(dtype)
    if isinstance(value, dict):
        if set(value) != {"dtype", "shape", "data"}:
            raise WireError(400, f"{what}: an array map has the keys dtype, shape and data, got {sorted(value)}")
        kind, dims, data = value["dtype"], value["shape"], value["data"]
        if not isinstance(kind, str) or not isinstance(data, bytes) or not isinstance(dims, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise WireError(400, f"{what}: an array map needs a dtype string, a list of ints as shape and binary data")
        if kind != dtype.str:
            raise WireError(400, f"{what}: dtype {kind!r}, expected {dtype.str!r}")
        if tuple(dims) != tuple(shape):
            raise WireError(400, f"{what}: shape {dims}, expected {list(shape)}")
        if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise WireError(400, f"{what}: {len(data)} bytes of data for shape {list(shape)} of {dtype.str}")
        array = np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, as torch wants
    else:
        if isinstance(value, (str, bytes)) or value is None:
            raise WireError(400, f"{what}: expected numbers, got {type(value).__name__}")
        try:
            raw = np.asarray(value)
        except ValueError as e:
            raise WireError(400, f"{what}: ragged lists ({e})") from None
        if raw.dtype.kind not in "biuf":
            raise WireError(400, f"{what}: expected numbers, got {raw.dtype.kind!r} data")
        if raw.shape != tuple(shape):
            raise WireError(400, f"{what}: shape {list(raw.shape)}, expected {list(shape)}")
        if raw.dtype != dtype and not np.can_cast(raw.dtype, dtype, "same_kind") \
                and not (raw.dtype.kind in "iu" and dtype.kind == "f"):
            raise WireError(400, f"{what}: {raw.dtype} values, expected {dtype}")
        if raw.dtype.kind == "f" and dtype.kind != "f":
            raise WireError(400, f"{what}: {raw.dtype} values, expected {dtype}")
        array = raw.astype(dtype, copy=False)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise WireError(400, f"{what}: NaN or inf")
    return array


def decode_value(space: gym.Space, value: Any, what: str, batch: int | None = None) -> Any:
    """A value of `space` (a batch of `batch` values with a leading dimension, when given), in
    the form a gymnasium env gives it: arrays, ints, dicts and tuples of them."""
    lead = () if batch is None else (batch,)
    if isinstance(space, gym.spaces.Discrete):
        if batch is None and isinstance(value, int) and not isinstance(value, bool):
            value = np.int64(value)
        else:
            value = decode_array(value, lead, np.int64, what)
        if np.any(value < space.start) or np.any(value >= space.start + space.n):
            raise WireError(400, f"{what}: {np.asarray(value).tolist()} outside Discrete({space.n}"
                                 f"{f', start={space.start}' if space.start else ''})")
        return value
    if isinstance(space, gym.spaces.Box):
        return decode_array(value, lead + space.shape, space.dtype, what)
    if isinstance(space, gym.spaces.MultiDiscrete):
        a = decode_array(value, lead + space.shape, space.dtype, what)
        if np.any(a < space.start) or np.any(a >= space.start + space.nvec):
            raise WireError(400, f"{what}: values outside {space}")
        return a
    if isinstance(space, gym.spaces.MultiBinary):
        a = decode_array(value, lead + space.shape, space.dtype, what)
        if np.any((a != 0) & (a != 1)):
            raise WireError(400, f"{what}: MultiBinary values must be 0 or 1")
        return a
    if isinstance(space, gym.spaces.Dict):
        if not isinstance(value, dict) or set(value) != set(space.spaces):
            raise WireError(400, f"{what}: expected a map with the keys {sorted(space.spaces)}")
        return {k: decode_value(s, value[k], f"{what}.{k}", batch) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        if not isinstance(value, list) or len(value) != len(space.spaces):
            raise WireError(400, f"{what}: expected a list of {len(space.spaces)} parts")
        return tuple(decode_value(s, v, f"{what}[{i}]", batch) for i, (s, v) in enumerate(zip(space.spaces, value)))
    raise WireError(400, f"{what}: space {space} is not supported on the wire")


def encode_value(space: gym.Space, value: Any, binary: bool) -> Any:
    """A value of `space` (or a batch of them) for a response: raw arrays in msgpack, lists in JSON."""
    if isinstance(space, gym.spaces.Dict):
        return {k: encode_value(s, value[k], binary) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return [encode_value(s, v, binary) for s, v in zip(space.spaces, value)]
    a = np.asarray(value)
    if a.ndim == 0:
        return a.item()
    return encode_array(a) if binary else a.tolist()


def batch_size_of(space: gym.Space, value: Any, limit: int) -> int:
    """The leading dimension of a batch of observations as sent (before decoding)."""
    while isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        if isinstance(space, gym.spaces.Dict):
            if not isinstance(value, dict) or not value:
                raise WireError(400, "obs: expected a map for a Dict space")
            key = next(iter(space.spaces))
            space, value = space.spaces[key], value.get(key)
        else:
            if not isinstance(value, list) or not value:
                raise WireError(400, "obs: expected a list for a Tuple space")
            space, value = space.spaces[0], value[0]
    if isinstance(value, dict) and isinstance(value.get("shape"), list) and value["shape"]:
        n = value["shape"][0]
    elif isinstance(value, list):
        n = len(value)
    else:
        raise WireError(400, "obs: expected a batch (a list, or an array with a leading batch dimension)")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
        raise WireError(400, f"obs: a batch of 1 to {limit} observations, got {n!r}")
    return n


# ---- rows of experience ------------------------------------------------------------------------
ROW = ("eps_id", "t", "obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "action_logp", "vf_preds",
       "weights_version")


def action_to_column(space: gym.Space, action: Any) -> np.ndarray:
    """An env action as batches store it: Discrete and MultiDiscrete counted from 0."""
    from flowrl.spaces import action_row_layout

    shape, dtype = action_row_layout(space)
    a = np.asarray(action).astype(dtype, copy=False).reshape(shape)
    if isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        a = a - space.start
    return a


class Episode:
    """One episode in progress: the action waiting for its next observation, the reward since.
    A row (in the order of ROW) is complete when the next observation arrives.

    >>> e = Episode(7, now=0.0)
    >>> e.act("s0", 1, -0.7, 0.5, 0) is None   # the first action completes no row
    True
    >>> e.add_reward(1.0)
    >>> e.act("s1", 0, -0.6, 0.4, 0)[:8]      # eps_id, t, obs, new_obs, actions, rewards, terminated, truncated
    (7, 0, 's0', 's1', 1, 1.0, False, False)
    >>> e.end("s2", truncated=True)[5:8], (e.ret, e.t)
    ((0.0, False, True), (1.0, 2))
    """

    __slots__ = ("eps_id", "t", "ret", "pending", "reward", "last_seen", "busy")

    def __init__(self, eps_id: int, now: float):
        self.eps_id, self.t, self.ret = eps_id, 0, 0.0
        self.pending: tuple | None = None  # (obs, action, logp, vf, weights_version)
        self.reward = 0.0
        self.last_seen = now
        self.busy = 0  # requests being served (a waiting one must not see its episode reaped)

    def add_reward(self, reward: float) -> None:
        if self.pending is None:
            raise WireError(409, f"episode {self.eps_id} has no action yet to credit a reward to")
        self.reward += reward

    def act(self, obs, action, logp, vf, version) -> tuple | None:
        """Records the action taken at `obs`; returns the row this completes (the previous step's)."""
        row = self._complete(obs, False, False)
        self.pending = (obs, action, logp, vf, version)
        return row

    def end(self, obs, truncated: bool) -> tuple | None:
        return self._complete(obs, not truncated, truncated)

    def _complete(self, new_obs, terminated: bool, truncated: bool) -> tuple | None:
        if self.pending is None:
            return None
        obs, action, logp, vf, version = self.pending
        row = (self.eps_id, self.t, obs, new_obs, action, self.reward, terminated, truncated, logp, vf, version)
        self.t += 1
        self.ret += self.reward
        self.reward, self.pending = 0.0, None
        return row


# ---- tokens and addresses ------------------------------------------------------------------------
def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token(path: str | os.PathLike) -> str:
    """The token in a file (surrounding whitespace dropped); ValueError naming the file."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the token file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the token file is not text") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{path}: the token file must hold one token (printable, no spaces)")
    return token


def write_token(path: str | os.PathLike, token: str) -> Path:
    """`token` into a new file only its owner may read (mode 0600)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_token_file: bool) -> None:
    """ValueError when `host` is not a loopback address and no token file was given: a token
    generated on the spot would be unknown to clients on other machines, and an open port
    there must not be guarded by nothing."""
    if not is_loopback(host) and not has_token_file:
        raise ValueError(f"binding to {host} (not a loopback address) needs a token file")


# ---- settings of the training server -------------------------------------------------------------
@dataclass
class ExternalConfig:
    """`config.external`: where the policy server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 9900                          # 0: any free port (the address is in the first result)
    token_file: str | None = None             # null: a new token, written to RUN_DIR/external_token
    episode_timeout_s: float = 60.0           # an episode silent this long is dropped (num_abandoned_episodes)
    request_timeout_s: float = 30.0           # a request waits this long for room in the buffer, then 503
    max_buffered_rows: int | None = None      # completed rows held for the plan; null: one sample's worth
    max_open_episodes: int = 1024
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int = 256
    observation_space: dict | None = None    # the spaces when the experiment names no env, e.g.
    action_space: dict | None = None         # {type: Box, low: -1, high: 1, shape: [4]}, {type: Discrete, n: 2}

    def validate(self) -> None:
        from flowrl.config import ConfigError

        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in [0, 65535], got {self.port}")
        try:
            check_bind(self.host, self.token_file is not None)
        except ValueError as e:
            raise ConfigError("token_file", str(e)) from None
        if self.token_file is not None:
            try:
                read_token(self.token_file)
            except ValueError as e:
                raise ConfigError("token_file", str(e)) from None
        for key in ("episode_timeout_s", "request_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("max_open_episodes", "max_body_bytes", "max_connections"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_buffered_rows is not None and self.max_buffered_rows < 1:
            raise ConfigError("max_buffered_rows", f"must be >= 1 or null, got {self.max_buffered_rows}")
        if (self.observation_space is None) != (self.action_space is None):
            missing = "action_space" if self.action_space is None else "observation_space"
            raise ConfigError(missing, "give both observation_space and action_space, or neither (the env's)")
        self.spaces()

    def spaces(self) -> dict[str, gym.Space] | None:
        """obs/new_obs/actions spaces from the settings, or None when they come from the env."""
        from flowrl.config import ConfigError
        from flowrl.spaces import space_from_spec

        if self.observation_space is None:
            return None
        out = {}
        for key, name in (("observation_space", "obs"), ("action_space", "actions")):
            try:
                out[name] = space_from_spec(getattr(self, key))
            except ValueError as e:
                raise ConfigError(key, str(e)) from None
        out["new_obs"] = out["obs"]
        return out


# ---- the HTTP server -----------------------------------------------------------------------------
Route = Callable[[dict[str, Any], str], dict[str, Any]]  # (request, media type) -> response fields


def handle(routes: Mapping[str, Route], token: str, path: str, headers: Mapping[str, str], body: bytes,
           max_body_bytes: int) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request: the token, then the path, the body's size,
    encoding and version, then the route. Shared by WireServer and the Ray Serve deployment."""
    try:
        check_token(headers.get("Authorization") or headers.get("authorization"), token)
        route = routes.get(path.split("?")[0])
        if route is None:
            raise WireError(404, f"no such endpoint {path!r} (endpoints: {', '.join(sorted(routes))})")
        if len(body) > max_body_bytes:
            raise WireError(413, f"body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
        kind = media_type(headers.get("Content-Type") or headers.get("content-type"))
        response = route(decode_body(body, kind), kind)
        return 200, kind, encode_body(response, kind)
    except WireError as e:
        return e.status, "text/plain; charset=utf-8", (e.reason + "\n").encode()


def check_token(authorization: str | None, token: str) -> None:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise WireError(401, "missing bearer token (header Authorization: Bearer <token>)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise WireError(401, "wrong token")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive: one connection per client
    disable_nagle_algorithm = True      # headers and body leave at once (no 40 ms delayed-ACK stall)
    timeout = 120                       # an idle connection is closed after this long
    error_message_format = "%(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    server: "_HTTPServer"

    def do_POST(self) -> None:
        app = self.server.app
        authorization = self.headers.get("Authorization")
        try:
            check_token(authorization, app.token)
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding") or length is None:
                raise WireError(411, "a Content-Length header is required (no chunked bodies)")
            try:
                n = int(length)
            except ValueError:
                raise WireError(400, f"Content-Length {length!r} is not a number") from None
            if not 0 <= n <= app.max_body_bytes:
                raise WireError(413, f"body of {n} bytes exceeds the limit of {app.max_body_bytes}")
        except WireError as e:
            self.close_connection = True  # the body, if any, is not read
            self._reply(e.status, "text/plain; charset=utf-8", (e.reason + "\n").encode())
            return
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            return
        try:
            status, kind, payload = handle(app.routes, app.token, self.path, self.headers, body, app.max_body_bytes)
        except Exception as e:  # a bug in a route: the request fails, the server goes on
            app.errors += 1
            status, kind, payload = 500, "text/plain; charset=utf-8", \
                f"internal error: {type(e).__name__}: {e}\n".encode()
        self._reply(status, kind, payload)

    def do_GET(self) -> None:
        self.close_connection = True
        self._reply(405, "text/plain; charset=utf-8", b"use POST\n", {"Allow": "POST"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _reply(self, status: int, kind: str, payload: bytes, extra: Mapping[str, str] = {}) -> None:
        if status >= 400:
            self.server.app.rejected += 1
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        for k, v in extra.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # end_headers() with the body appended: the response leaves in one write.
        self._headers_buffer.extend((b"\r\n", payload))
        self.flush_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a request log per action would drown everything else


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: "WireServer"

    def process_request(self, request, client_address):
        app = self.app
        with app.lock:
            full = len(app.connections) >= app.max_connections or app.stopping
            if not full:
                app.connections.add(request)
        if full:
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 20\r\nConnection: close\r\n\r\ntoo many connections")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.app.lock:
            self.app.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """A connection that failed outside a request's handling (a client gone mid-request, a
        socket closed by stop()): the connection ends, the server goes on, nothing is printed."""
        import sys

        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            self.app.errors += 1
            print(f"flowrl: warning: {self.app.name}: connection from {client_address[0]} failed: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)


class WireServer:
    """An HTTP server for `routes` (path -> route), in daemon threads: one to accept, one per
    connection. `stop()` closes the listening socket and every open connection."""

    def __init__(self, host: str, port: int, token: str, routes: Mapping[str, Route],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_connections: int = 256, name: str = "flowrl"):
        self.name = name
        self.token, self.routes = token, dict(routes)
        self.max_body_bytes, self.max_connections = max_body_bytes, max_connections
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.stopping = False
        self.rejected = 0   # requests answered with an error status
        self.errors = 0     # of which were bugs (500)
        self._server = _HTTPServer((host, port), _Handler)  # OSError when the port is taken
        self._server.app = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"{name}:http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def stop(self) -> None:
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            open_connections = list(self.connections)
        self._server.shutdown()
        self._server.server_close()
        for conn in open_connections:  # keep-alive connections would otherwise go on being served
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
