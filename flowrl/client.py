"""PolicyClient: an external application's side of the policy server a plan trains from
(`config: {input: external}`; flowrl.connectors.external). One client serves any number of
episodes, interleaved; run as many clients (threads or processes) as you like.

    from flowrl.client import PolicyClient
    client = PolicyClient("http://127.0.0.1:9900", token=open("runs/x/latest/external_token").read().strip())
    episode = client.start_episode()
    obs, _ = env.reset()
    while True:
        action = client.get_action(episode, obs)        # or: client.log_action(episode, obs, my_action)
        obs, reward, terminated, truncated, _ = env.step(action)
        client.log_returns(episode, reward)
        if terminated or truncated:
            client.end_episode(episode, obs, truncated=truncated)
            break

`inference="remote"` (the default) asks the server for every action: the learner's current
policy acts. Rewards given to `log_returns` travel with the episode's next request, so a step
costs one round trip. `inference="local"` pulls the policy's weights every `update_interval`
seconds and acts here; whole transitions go to the server in batches (Arrow IPC) of up to
`batch_rows` rows, or every `flush_interval_s` seconds, and at `close()`. Local inference needs
torch (and sets its process's torch threads to `num_threads`, 1 by default, as rollout workers
do; None leaves them); remote inference only numpy and msgpack. Weights arrive as raw tensors in msgpack:
nothing the server sends is unpickled.

A server that is busy (the plan is training and its buffer is full) answers 503: the client
retries for up to `busy_timeout_s`. Other refusals raise PolicyServerError (status, reason);
a server that is gone raises ConnectionError.
"""

from __future__ import annotations

import http.client
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import msgpack
import numpy as np

from flowrl.wire import MSGPACK, WIRE_VERSION, Episode, WireError, decode_value, encode_value

__all__ = ["PolicyClient", "PolicyServerError"]


class PolicyServerError(RuntimeError):
    """The server refused a request: `status` (HTTP) and its one-line `reason`."""

    def __init__(self, status: int, reason: str, path: str = ""):
        self.status, self.reason, self.path = status, reason, path
        super().__init__(f"{path}: {status} {reason}" if path else f"{status} {reason}")


class _Connection:
    """One kept-alive HTTP/1.1 connection to a flowrl server, speaking just what the client
    needs: a POST with a Content-Length body, sent in one write (http.client writes headers and
    body apart, a second wake-up of the server per request), and the answer's status, length
    and body."""

    MAX_LINE = 1 << 16
    MAX_HEADERS = 100

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.rfile = None

    def request(self, path: str, body: bytes, headers: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether the server closes the connection after this answer)."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            # Without this, Nagle's algorithm and delayed ACKs can add ~40 ms to a round trip.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.rfile = self.sock.makefile("rb")
        self.sock.sendall(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), headers, len(body), body))
        line = self.rfile.readline(self.MAX_LINE)
        if not line:
            raise http.client.RemoteDisconnected("the server closed the connection without an answer")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise http.client.BadStatusLine(line.decode("latin-1", "replace").strip())
        status, length, close = int(parts[1]), 0, parts[0] == b"HTTP/1.0"
        for _ in range(self.MAX_HEADERS):
            line = self.rfile.readline(self.MAX_LINE)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        payload = self.rfile.read(length)
        if len(payload) < length:
            raise http.client.RemoteDisconnected("the server closed the connection mid-answer")
        if close:
            self.close()
        return status, payload, close

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.rfile.close()
                self.sock.close()
            except OSError:
                pass
        self.sock = self.rfile = None


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of "http://host:port" or "host:port"."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"address {address!r}: expected http://HOST:PORT")
    return parts.hostname, parts.port


def from_wire(value: Any) -> Any:
    """An action as the server sent it: raw arrays become numpy arrays, the rest stays."""
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"} and isinstance(value["data"], bytes):
            return np.frombuffer(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(from_wire(v) for v in value)
    return value


class PolicyClient:
    """See the module docstring. Not thread-safe: give each thread a client of its own."""

    def __init__(self, address: str, token: str, inference: str = "remote", update_interval: float = 10.0,
                 timeout: float = 60.0, batch_rows: int = 512, flush_interval_s: float = 1.0,
                 busy_timeout_s: float = 300.0, num_threads: int | None = 1):
        if inference not in ("remote", "local"):
            raise ValueError(f"inference must be 'remote' or 'local', got {inference!r}")
        self.address = address
        self.inference = inference
        self.update_interval, self.batch_rows, self.flush_interval_s = update_interval, batch_rows, flush_interval_s
        self.busy_timeout_s = busy_timeout_s
        host, port = parse_address(address)
        self._conn = _Connection(host, port, timeout=timeout)
        self._used = False  # the connection has served a request (a failure may mean the server closed it idle)
        self._headers = (f"Host: {host}:{port}\r\nContent-Type: {MSGPACK}\r\n"
                         f"Authorization: Bearer {token.strip()}\r\n").encode()
        self._rewards: dict[int, float] = {}  # remote: reward since the episode's last request
        self._acted: set[int] = set()
        from flowrl.spaces import space_from_dict

        # The spaces, so that what is sent is checked (and converted to the space's dtype) here.
        self._spec = self.call("/policy")
        self.observation_space = space_from_dict(self._spec["observation_space"])
        self.action_space = space_from_dict(self._spec["action_space"])
        if inference == "local":
            self._setup_local(num_threads)

    # ---- the API ----------------------------------------------------------------------------
    def start_episode(self) -> int:
        episode_id = self.call("/start_episode")["episode_id"]
        if self.inference == "local":
            self._episodes[episode_id] = Episode(episode_id, time.monotonic())
        return episode_id

    def get_action(self, episode_id: int, obs: Any) -> Any:
        """The action to take at `obs`, from the learner's policy (remote) or its copy here (local)."""
        if self.inference == "local":
            episode, row = self._local_episode(episode_id), self._local_obs(obs)
            out = self.policy.compute_actions(row)
            self._record(episode.act(row[0], out.actions[0], out.logp[0], out.values[0], self._weights_version))
            action = out.env_actions[0]
            return int(action) if np.ndim(action) == 0 else action
        response = self.call("/get_action", self._step_fields(episode_id, obs))
        self._acted.add(episode_id)
        return from_wire(response["action"])

    def log_action(self, episode_id: int, obs: Any, action: Any) -> None:
        """Records an action the application chose itself (off-policy experience)."""
        if self.inference == "local":
            from flowrl.policy import score_actions
            from flowrl.wire import action_to_column

            episode, row = self._local_episode(episode_id), self._local_obs(obs)
            column = action_to_column(self.action_space, self._checked(self.action_space, action, "action"))
            logp, vf = score_actions(self.policy, row, column[None])
            self._record(episode.act(row[0], column, logp[0], vf[0], self._weights_version))
            return
        fields = self._step_fields(episode_id, obs)
        fields["action"] = self._to_wire_action(action)
        self.call("/log_action", fields)
        self._acted.add(episode_id)

    def log_returns(self, episode_id: int, reward: float, info: dict | None = None) -> None:
        """Adds `reward` to the last action's. (`info` is accepted as RLlib's client takes it;
        it is not sent: nothing trains on it.)"""
        reward = float(reward)
        if not np.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        if self.inference == "local":
            try:
                self._local_episode(episode_id).add_reward(reward)
            except WireError as e:
                raise ValueError(e.reason) from None
            return
        if episode_id not in self._acted:
            raise ValueError(f"episode {episode_id} has no action yet to credit a reward to")
        self._rewards[episode_id] = self._rewards.get(episode_id, 0.0) + reward

    def end_episode(self, episode_id: int, obs: Any, truncated: bool = False) -> None:
        """Ends the episode at its last observation: terminated, or `truncated` (cut by a time
        limit: its value is bootstrapped)."""
        if self.inference == "local":
            episode, row = self._local_episode(episode_id), self._local_obs(obs)
            self._record(episode.end(row[0], bool(truncated)), ended=True)
            del self._episodes[episode_id]
            return
        fields = self._step_fields(episode_id, obs)
        fields["truncated"] = bool(truncated)
        self.call("/end_episode", fields)
        self._acted.discard(episode_id)

    def close(self) -> None:
        """Sends the rows still held (local inference) and closes the connection."""
        try:
            if self.inference == "local" and self._rows:
                self.flush()
        finally:
            self._conn.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------------------------
    def call(self, path: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST a msgpack body to `path`; the answer's fields. 503 is retried (with backoff)
        for up to busy_timeout_s."""
        body = msgpack.packb({"v": WIRE_VERSION, **(fields or {})}, use_bin_type=True)
        deadline, delay = time.monotonic() + self.busy_timeout_s, 0.02
        while True:
            status, payload = self._post(path, body)
            if status == 200:
                return msgpack.unpackb(payload, raw=False)
            reason = payload.decode("utf-8", "replace").strip()
            if status == 503 and "stopping" not in reason and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            raise PolicyServerError(status, reason, path)

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                status, payload, closed = self._conn.request(path, body, self._headers)
                self._used = not closed
                return status, payload
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._conn.close()
                # A kept-alive connection the server closed while idle: the request never got
                # there, so it is sent once more on a new one.
                if attempt == 0 and self._used:
                    self._used = False
                    continue
                raise ConnectionError(f"{self.address}{path}: {type(e).__name__}: {e}") from None
            except (OSError, http.client.HTTPException, ValueError) as e:
                self._conn.close()
                raise ConnectionError(f"{self.address}{path}: {getattr(e, 'strerror', None) or e}") from None
        raise AssertionError("unreachable")

    def _step_fields(self, episode_id: int, obs: Any) -> dict[str, Any]:
        fields = {"episode_id": int(episode_id), "obs": self._to_wire_obs(obs)}
        reward = self._rewards.pop(episode_id, 0.0)
        if reward:
            fields["reward"] = reward
        return fields

    def _to_wire_obs(self, obs: Any) -> Any:
        return encode_value(self.observation_space, self._checked(self.observation_space, obs, "obs"), True)

    def _to_wire_action(self, action: Any) -> Any:
        return encode_value(self.action_space, self._checked(self.action_space, action, "action"), True)

    @staticmethod
    def _checked(space, value: Any, what: str) -> Any:
        try:
            return decode_value(space, _plain(value), what)
        except WireError as e:
            raise ValueError(e.reason) from None

    # ---- local inference --------------------------------------------------------------------
    def _setup_local(self, num_threads: int | None) -> None:
        import torch

        from flowrl.policy import POLICY_CLASSES, _MODELS, make_policy

        if num_threads:
            # As rollout workers do: a small model gains nothing from more threads, and several
            # clients on one machine would spin against each other for its cores.
            torch.set_num_threads(num_threads)

        spec = self._spec
        name, model = spec["policy"], dict(spec.get("model") or {})
        if name not in POLICY_CLASSES:
            raise ValueError(f"the server's policy class {name!r} is not one of flowrl's built-in ones "
                             f"({', '.join(POLICY_CLASSES)}); use inference='remote'")
        custom = model.get("custom_model")
        if custom and custom not in _MODELS:  # never import a module because a server named it
            raise ValueError(f"the server's model is custom_model {custom!r}: register it in this process first "
                             "(flowrl.policy.register_model), or use inference='remote'")
        self.policy = make_policy(name, self.observation_space, self.action_space, model=model,
                                  **dict(spec.get("policy_config") or {}))
        self.max_rows_per_request = int(spec.get("max_rows_per_request", 1 << 16))
        self._episodes: dict[int, Episode] = {}
        self._rows: list[tuple] = []
        self._snapshot = -1
        self._weights_version = 0
        self._last_flush = time.monotonic()
        self.pull_weights()

    def pull_weights(self) -> bool:
        """Fetch the learner's weights if they changed since the last pull; True if they did."""
        import torch

        response = self.call("/weights", {"have": self._snapshot})
        self._last_pull = time.monotonic()
        if response.get("unchanged"):
            return False
        tensors = {}
        for name, t in response["tensors"].items():
            array = np.frombuffer(t["data"], dtype=np.dtype(t["dtype"])).reshape(t["shape"]).copy()
            tensors[name] = torch.from_numpy(array)
        self.policy.set_weights(tensors, response["weights_version"])
        self._snapshot, self._weights_version = response["snapshot"], response["weights_version"]
        return True

    def flush(self) -> None:
        """Send the transitions held here (local inference)."""
        from flowrl.sample_batch import SampleBatch

        rows, self._rows = self._rows, []
        self._last_flush = time.monotonic()
        for start in range(0, len(rows), self.max_rows_per_request):
            part = list(zip(*rows[start:start + self.max_rows_per_request]))
            eps_id, _t, obs, new_obs, actions, rewards, terminateds, truncateds, logp, vf, version = part
            columns = {"eps_id": np.array(eps_id, dtype=np.int64), "obs": np.array(obs), "new_obs": np.array(new_obs),
                       "actions": np.array(actions), "rewards": np.array(rewards, dtype=np.float32),
                       "terminateds": np.array(terminateds, dtype=bool), "truncateds": np.array(truncateds, dtype=bool),
                       "action_logp": np.array(logp, dtype=np.float32), "vf_preds": np.array(vf, dtype=np.float32),
                       "weights_version": np.array(version, dtype=np.int64)}
            self.call("/experience", {"rows": SampleBatch(columns).to_ipc().to_pybytes()})

    def _local_episode(self, episode_id: int) -> Episode:
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise ValueError(f"unknown episode_id {episode_id} (not started by this client, or ended)")
        return episode

    def _local_obs(self, obs: Any) -> np.ndarray:
        from flowrl.policy import obs_to_array
        from flowrl.rollout import add_batch_dim

        value = self._checked(self.observation_space, obs, "obs")
        return obs_to_array(self.observation_space, add_batch_dim(self.observation_space, value))

    def _record(self, row: tuple | None, ended: bool = False) -> None:
        if row is not None:
            self._rows.append(row)
        now = time.monotonic()
        if self._rows and (len(self._rows) >= self.batch_rows or now - self._last_flush >= self.flush_interval_s):
            self.flush()
        if now - self._last_pull >= self.update_interval:
            self.pull_weights()


def _plain(value: Any) -> Any:
    """An observation or action as decode_value reads it: numpy arrays as they are, numpy
    scalars as Python numbers, tuples as lists, dicts part by part."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
