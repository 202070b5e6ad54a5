"""The policy server: experience from external applications (simulators, games, plants written
in any language that call out for actions), as the sample source of any plan.

With `config: {input: external, external: {host, port, token_file, ...}}` the plan's
ParallelRollouts reads its batches from here instead of from rollout workers. Clients speak
the wire format of flowrl.wire (flowrl.client.PolicyClient is one):

    /start_episode {}                               -> {episode_id}
    /get_action    {episode_id, obs, reward?}       -> {action}   (the learner's current policy)
    /log_action    {episode_id, obs, action, reward?} -> {}       (the client chose the action)
    /log_returns   {episode_id, reward}             -> {}
    /end_episode   {episode_id, obs, reward?, truncated?} -> {}
    /experience    {rows: Arrow IPC}                -> {}         (local inference: whole transitions)
    /policy        {}                               -> {spaces, policy class, model}
    /weights       {have?}                          -> {snapshot, weights_version, tensors}

A transition is complete when the episode's next observation arrives (the next get_action,
log_action or end_episode); `reward` on those requests adds to the reward of the previous
action, as log_returns does. Completed rows wait in a bounded buffer until the plan samples
them: when it is full, requests that would add a row wait (a plan that is training pauses its
clients, so training_intensity holds), and answer 503 after `request_timeout_s`. `sample()`
returns `num_envs_per_worker * rollout_fragment_length` rows with a RolloutWorker's columns
(obs, new_obs, actions, rewards, terminateds, truncateds, eps_id, t, action_logp, vf_preds,
next_vf_preds, weights_version), each episode's rows together in time order.

Actions come from a copy of the learner's policy, refreshed at every sample(): rows collected
while the plan trained carry the previous weights_version (at most `max_buffered_rows` of them
per batch). log_action rows carry the log-probability and value the policy gives the client's
action: for an on-policy plan (PPO) they are off-policy data it treats as its own, so use
log_action with off-policy plans (DQN, SAC), which store them in replay.

An episode that hears nothing for `episode_timeout_s` is dropped: its rows already complete
stay (real transitions; the last one bootstraps from V(new_obs)), its unfinished step is lost,
it is not reported as finished, and `num_abandoned_episodes` counts it.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

from flowrl.config import ConfigError, parse_config
from flowrl.plan import PlanContext
from flowrl.policy import make_policy, obs_to_array, score_actions
from flowrl.rollout import add_batch_dim
from flowrl.sample_batch import SampleBatch, arrow_to_numpy
from flowrl.spaces import action_row_layout, obs_row_layout, space_to_dict
from flowrl.stream import Map, Stream
from flowrl.wire import (MSGPACK, ROW, Episode, ExternalConfig, WireError, WireServer, action_to_column,
                         decode_value, encode_array, encode_value, field, new_token, read_token, reward_field,
                         write_token)

# The columns of /experience rows (local inference).
EXPERIENCE_COLUMNS = ("eps_id", "obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "action_logp",
                      "vf_preds", "weights_version")
MAX_ROWS_PER_REQUEST = 1 << 16
TOKEN_FILE_NAME = "external_token"


class ExternalInput:
    """The policy server and the experience it collects; see the module docstring. Built
    unstarted (cheap, binds nothing); `stream(workers)` is the plan's sample source, which
    starts the server when the plan starts and stops it when the plan closes. `run_dir`, when
    set before the start, is where a generated token is written (`external_token`, mode 0600)."""

    def __init__(self, settings: ExternalConfig, spaces: dict[str, gym.Space], rows_per_sample: int,
                 run_dir: str | Path | None = None):
        self.settings = settings
        self.spaces = {"obs": spaces["obs"], "new_obs": spaces["obs"], "actions": spaces["actions"]}
        self.rows_per_sample = rows_per_sample
        self.capacity = max(rows_per_sample, settings.max_buffered_rows or rows_per_sample)
        self.run_dir = run_dir
        self.token_file: Path | None = Path(settings.token_file) if settings.token_file else None
        self.token = read_token(self.token_file) if self.token_file else new_token()
        self.cond = threading.Condition()
        self.episodes: dict[int, Episode] = {}
        self.rows: collections.deque[tuple] = collections.deque()
        self.finished: dict[int, tuple[float, int]] = {}  # (return, length) by episode, until its last row is sampled
        self.num_abandoned_episodes = 0
        self.server: WireServer | None = None
        self.policy = None
        self.workers = None
        self._stopping = False
        self._last_reap = 0.0
        self._snapshot = 0
        self._weights_payload: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any, worker_kwargs: dict[str, Any]) -> "ExternalInput":
        """The server for a plan's config (`input: external`). Sets `worker_kwargs` so that no
        env is made or stepped: the policy is built from the env's spaces (read once) or from
        config.external's observation_space and action_space."""
        from flowrl.planfile import env_spaces

        settings = parse_config(ExternalConfig, config.external, prefix="external")
        spaces = settings.spaces() or env_spaces(worker_kwargs.get("env"), config.env_config)
        if spaces is None:
            raise ConfigError("external.observation_space", "missing: without an env the spaces must be given")
        worker_kwargs.update(env=None, observation_space=spaces["obs"], action_space=spaces["actions"])
        return cls(settings, spaces, config.num_envs_per_worker * config.rollout_fragment_length)

    # ---- the plan's side --------------------------------------------------------------------
    def stream(self, workers) -> Stream[SampleBatch]:
        """Batches of `rows_per_sample` rows, as a rollout worker's sample() gives them."""
        self.workers = workers
        return Stream.source(lambda: iter(self.sample, None), name="ExternalInput").then(_ServeWhilePlanRuns(self))

    @property
    def address(self) -> str | None:
        return self.server.address if self.server is not None else None

    def start(self, workers=None) -> str:
        """Bind and serve (once); the address. `workers`: whose learner policy to act with."""
        if self.server is not None:
            return self.server.address
        self.workers = workers or self.workers
        kw = self.workers.worker_kwargs
        seed = kw.get("seed")
        self.policy_spec = {"policy": kw.get("policy", "TorchPolicy"), "model": dict(kw.get("model") or {}),
                            "policy_config": dict(kw.get("policy_config") or {})}
        self.policy = make_policy(self.policy_spec["policy"], self.spaces["obs"], self.spaces["actions"],
                                  model=kw.get("model"), seed=seed, lr=kw.get("lr", 3e-4),
                                  sample_seed=None if seed is None else seed + 7919, **self.policy_spec["policy_config"])
        learner = self.workers.policy
        self.policy.set_weights(learner.get_weights(), learner.weights_version)
        if self.token_file is None and self.run_dir is not None:
            self.token_file = write_token(Path(self.run_dir) / TOKEN_FILE_NAME, self.token)
        s = self.settings
        routes = {"/start_episode": self._start_episode, "/get_action": self._get_action,
                  "/log_action": self._log_action, "/log_returns": self._log_returns, "/end_episode": self._end_episode,
                  "/experience": self._experience, "/policy": self._policy, "/weights": self._weights}
        try:
            self.server = WireServer(s.host, s.port, self.token, routes, s.max_body_bytes, s.max_connections,
                                     name="ExternalInput")
        except OSError as e:
            raise ConfigError("external.port", f"cannot listen on {s.host}:{s.port}: {e.strerror or e}") from None
        return self.server.address

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        if self.server is not None:
            self.server.stop()

    def sample(self) -> SampleBatch | None:
        """The next `rows_per_sample` rows (waiting for clients), with the episodes they finish;
        None once the server stops. The acting policy takes the learner's weights first."""
        learner = self.workers.policy
        weights = learner.get_weights()
        with self.cond:
            self.policy.set_weights(weights, learner.weights_version)
            self._snapshot += 1
            self._weights_payload = None
            self._reap()
            while len(self.rows) < self.rows_per_sample:
                if self._stopping:
                    return None
                self.cond.wait(0.1)
                self._reap()
            rows = [self.rows.popleft() for _ in range(self.rows_per_sample)]
            self.cond.notify_all()  # room for the requests waiting to add rows
            return self._assemble(rows)

    def _assemble(self, rows: list[tuple]) -> SampleBatch:
        """Rows in arrival order -> a batch with each episode's rows together, in time order, and
        the episodes whose last row it holds. Lock held."""
        cols = dict(zip(ROW, zip(*rows)))
        eps, t = np.array(cols["eps_id"], dtype=np.int64), np.array(cols["t"], dtype=np.int64)
        _, first_row, inverse = np.unique(eps, return_index=True, return_inverse=True)
        order = np.lexsort((t, first_row[inverse]))  # episodes in order of arrival, steps in order
        obs_dtype = obs_row_layout(self.spaces["obs"])[1]
        action_dtype = action_row_layout(self.spaces["actions"])[1]
        dtypes = {"eps_id": np.int64, "t": np.int64, "obs": obs_dtype, "new_obs": obs_dtype, "actions": action_dtype,
                  "rewards": np.float32, "terminateds": np.bool_, "truncateds": np.bool_, "action_logp": np.float32,
                  "vf_preds": np.float32, "weights_version": np.int64}
        columns = {k: np.array(cols[k], dtype=dtypes[k])[order] for k in ROW}
        eps, t = columns["eps_id"], columns["t"]
        terminated, truncated, vf = columns["terminateds"], columns["truncateds"], columns["vf_preds"]
        # V(s_{t+1}): the next row's vf_preds inside an episode we hold the next step of; a fresh
        # estimate from new_obs where the trajectory stops here without terminating.
        continues = np.zeros(len(eps), dtype=bool)
        continues[:-1] = (eps[1:] == eps[:-1]) & (t[1:] == t[:-1] + 1)
        following = np.zeros_like(vf)
        following[:-1] = vf[1:]
        next_vf = np.where(terminated, 0.0, following).astype(np.float32)
        need = ~terminated & (truncated | ~continues)
        if need.any():
            next_vf[need] = self.policy.value(columns["new_obs"][need])
        columns["next_vf_preds"] = next_vf
        episodes = [self.finished.pop(e) for e in eps[terminated | truncated].tolist()]
        return SampleBatch(columns, self.spaces, episodes)

    def _reap(self) -> None:
        """Drops episodes silent for episode_timeout_s (a pass over them at most every second, or
        twice per timeout). Lock held."""
        now = time.monotonic()
        timeout = self.settings.episode_timeout_s
        if now - self._last_reap < min(1.0, timeout / 2):
            return
        self._last_reap = now
        for eps_id in [e.eps_id for e in self.episodes.values() if not e.busy and now - e.last_seen > timeout]:
            del self.episodes[eps_id]
            self.num_abandoned_episodes += 1

    # ---- the clients' side ------------------------------------------------------------------
    def _obs_row(self, request: dict[str, Any], name: str = "obs") -> np.ndarray:
        space = self.spaces["obs"]
        obs = decode_value(space, field(request, name, (list, dict, int, float)), name)
        return obs_to_array(space, add_batch_dim(space, obs))

    def _episode(self, request: dict[str, Any]) -> Episode:
        eps_id = field(request, "episode_id", int)
        episode = self.episodes.get(eps_id)
        if episode is None:
            raise WireError(404, f"unknown episode_id {eps_id} (never started, already ended, or dropped after "
                                 f"{self.settings.episode_timeout_s:g} s without a request)")
        return episode

    def _add_rows(self, episodes: list[Episode], add, adds_rows: bool = True) -> Any:
        """Runs `add()` (which appends rows) once the buffer has room, with `episodes` marked busy
        so that none is reaped meanwhile. Lock held."""
        for episode in episodes:
            episode.busy += 1
        try:
            deadline = time.monotonic() + self.settings.request_timeout_s
            while adds_rows and len(self.rows) >= self.capacity and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireError(503, f"the learner has taken no experience for "
                                         f"{self.settings.request_timeout_s:g} s; retry later")
                self.cond.wait(min(left, 0.5))
            if self._stopping:
                raise WireError(503, "the server is stopping")
            result = add()
            self.cond.notify_all()
            return result
        finally:
            now = time.monotonic()
            for episode in episodes:
                episode.busy -= 1
                episode.last_seen = now

    def _start_episode(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        with self.cond:
            self._reap()
            if len(self.episodes) >= self.settings.max_open_episodes:
                raise WireError(429, f"{len(self.episodes)} episodes are open (max_open_episodes); end some first")
            eps_id = secrets.randbits(53)  # exact in JSON numbers too
            while eps_id in self.episodes:
                eps_id = secrets.randbits(53)
            self.episodes[eps_id] = Episode(eps_id, time.monotonic())
        return {"episode_id": eps_id}

    def _get_action(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        obs = self._obs_row(request)

        def choose():  # the acting policy's action, its log-probability and value
            out = self.policy.compute_actions(obs)
            return out.env_actions[0], out.actions[0], out.logp[0], out.values[0]

        action = self._act(request, obs, choose)
        return {"action": encode_value(self.spaces["actions"], action, kind == MSGPACK)}

    def _log_action(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        obs = self._obs_row(request)
        space = self.spaces["actions"]
        value = decode_value(space, field(request, "action", (list, dict, int, float)), "action")
        action = action_to_column(space, value)

        def choose():  # the client's action, scored by the acting policy
            logp, vf = score_actions(self.policy, obs, action[None])
            return value, action, logp[0], vf[0]

        self._act(request, obs, choose)
        return {}

    def _act(self, request: dict[str, Any], obs: np.ndarray, choose) -> Any:
        """Records the action `choose()` gives at `obs` in the request's episode (completing its
        previous step's row, once the buffer has room); returns the env action."""
        reward = reward_field(request)
        with self.cond:
            episode = self._episode(request)

            def act():
                if reward:
                    episode.add_reward(reward)
                env_action, action, logp, vf = choose()
                row = episode.act(obs[0], action, logp, vf, self.policy.weights_version)
                if row is not None:
                    self.rows.append(row)
                return env_action

            return self._add_rows([episode], act, adds_rows=episode.pending is not None)

    def _log_returns(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        reward = reward_field(request)
        with self.cond:
            episode = self._episode(request)
            episode.add_reward(reward)
            episode.last_seen = time.monotonic()
        return {}

    def _end_episode(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        obs = self._obs_row(request)
        reward = reward_field(request)
        truncated = field(request, "truncated", bool, False)
        with self.cond:
            episode = self._episode(request)

            def end():
                if reward:
                    episode.add_reward(reward)
                row = episode.end(obs[0], truncated)
                if row is not None:
                    self.rows.append(row)
                    self.finished[episode.eps_id] = (episode.ret, episode.t)
                del self.episodes[episode.eps_id]

            self._add_rows([episode], end, adds_rows=episode.pending is not None)
        return {}

    def _experience(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        columns = self._read_experience(field(request, "rows", bytes))
        n = len(columns["eps_id"])
        eps = columns["eps_id"]
        done = columns["terminateds"] | columns["truncateds"]
        # An episode's rows end at the row that ends it, if any: that row is its last one here.
        ids, last_from_end = np.unique(eps[::-1], return_index=True)
        last = (n - 1 - last_from_end)[np.searchsorted(ids, eps)]
        if np.any(done & (last != np.arange(n))):
            raise WireError(400, "rows: an episode has rows after the row that ended it")
        with self.cond:
            episodes = []
            for eps_id in ids.tolist():
                episode = self.episodes.get(eps_id)
                if episode is None:
                    raise WireError(404, f"rows: unknown eps_id {eps_id} (never started, already ended, or dropped)")
                if episode.pending is not None:
                    raise WireError(409, f"rows: episode {eps_id} has an action from get_action/log_action waiting "
                                         "for its next observation")
                episodes.append(episode)

            def add():
                c = columns
                for i, eps_id in enumerate(eps.tolist()):
                    episode = self.episodes[eps_id]
                    reward = float(c["rewards"][i])
                    self.rows.append((eps_id, episode.t, c["obs"][i], c["new_obs"][i], c["actions"][i], reward,
                                      bool(c["terminateds"][i]), bool(c["truncateds"][i]), c["action_logp"][i],
                                      c["vf_preds"][i], int(c["weights_version"][i])))
                    episode.t += 1
                    episode.ret += reward
                    if done[i]:
                        self.finished[eps_id] = (episode.ret, episode.t)
                        del self.episodes[eps_id]

            self._add_rows(episodes, add)
        return {"rows": n}

    def _read_experience(self, data: bytes) -> dict[str, np.ndarray]:
        """The columns of an Arrow IPC stream of transitions, each checked against the spaces."""
        try:
            table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
            table.validate(full=True)
            columns = arrow_to_numpy(table)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise WireError(400, f"rows: not a valid Arrow IPC stream of numeric columns ({e})") from None
        if set(columns) != set(EXPERIENCE_COLUMNS):
            missing = sorted(set(EXPERIENCE_COLUMNS) - set(columns))
            raise WireError(400, f"rows: columns {sorted(columns)}; expected {list(EXPERIENCE_COLUMNS)}"
                                 f"{f' (missing {missing})' if missing else ''}")
        n = table.num_rows
        if not 1 <= n <= MAX_ROWS_PER_REQUEST:
            raise WireError(400, f"rows: 1 to {MAX_ROWS_PER_REQUEST} rows per request, got {n}")
        obs_shape, obs_dtype = obs_row_layout(self.spaces["obs"])
        act_shape, act_dtype = action_row_layout(self.spaces["actions"])
        layout = {"eps_id": ((), np.int64), "obs": (obs_shape, obs_dtype), "new_obs": (obs_shape, obs_dtype),
                  "actions": (act_shape, act_dtype), "rewards": ((), np.float32), "terminateds": ((), np.bool_),
                  "truncateds": ((), np.bool_), "action_logp": ((), np.float32), "vf_preds": ((), np.float32),
                  "weights_version": ((), np.int64)}
        out = {}
        for name, (shape, dtype) in layout.items():
            a = columns[name]
            if a.shape[1:] != shape or a.dtype != dtype:
                raise WireError(400, f"rows: column {name!r} is {a.dtype}{list(a.shape[1:])}, expected "
                                     f"{np.dtype(dtype)}{list(shape)}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise WireError(400, f"rows: column {name!r} has NaN or inf")
            out[name] = a
        space = self.spaces["actions"]
        if isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
            high = space.n if isinstance(space, gym.spaces.Discrete) else space.nvec
            if np.any(out["actions"] < 0) or np.any(out["actions"] >= high):
                raise WireError(400, f"rows: column 'actions' has values outside {space} (counted from 0)")
        return out

    def _policy(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        if kind != MSGPACK:
            raise WireError(415, "/policy answers in msgpack only (the spaces hold raw arrays)")
        return {"observation_space": space_to_dict(self.spaces["obs"]),
                "action_space": space_to_dict(self.spaces["actions"]), **self.policy_spec,
                "max_rows_per_request": MAX_ROWS_PER_REQUEST}

    def _weights(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        if kind != MSGPACK:
            raise WireError(415, "/weights answers in msgpack only (raw tensors)")
        have = field(request, "have", int, -1)
        with self.cond:
            if have == self._snapshot:
                return {"snapshot": self._snapshot, "unchanged": True}
            if self._weights_payload is None:
                tensors = {k: encode_array(v.detach().cpu().numpy()) for k, v in self.policy.get_weights().items()}
                self._weights_payload = {"snapshot": self._snapshot, "weights_version": self.policy.weights_version,
                                         "tensors": tensors}
            return self._weights_payload


class _ServeWhilePlanRuns(Map):
    """Starts the server when the plan starts (before the first sample), stops it when the plan
    closes; counts abandoned episodes and rejected requests into the plan's counters, and puts
    the server's address into the first result (the progress line shows it)."""

    def __init__(self, source: ExternalInput):
        self.source = source
        self.reported = False
        self.seen = {"num_abandoned_episodes": 0, "num_rejected_requests": 0}

    def setup(self, ctx: PlanContext) -> None:
        import sys

        self.ctx = ctx
        for key in self.seen:
            ctx.counters.setdefault(key, 0)
        address = self.source.start()
        # Clients need the address and token before the first result (which their experience makes).
        where = f"; token in {self.source.token_file}" if self.source.token_file else ""
        print(f"flowrl: serving external clients at {address}{where}", file=sys.stderr, flush=True)

    def __call__(self, batch: SampleBatch) -> SampleBatch:
        now = {"num_abandoned_episodes": self.source.num_abandoned_episodes,
               "num_rejected_requests": self.source.server.rejected}
        for key, value in now.items():
            self.ctx.counters[key] += value - self.seen[key]
        self.seen = now
        if not self.reported:
            self.ctx.info["external_address"] = self.source.address
            self.reported = True
        return batch

    def teardown(self) -> None:
        self.source.stop()
