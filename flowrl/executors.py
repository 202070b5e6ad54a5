"""Executors run a plan's actors: in the calling process (local) or as Ray actors (ray).

A plan never names its executor; the same plan runs on either, chosen by configuration
(`make_executor("local")` / `make_executor("ray", num_cpus=2)`). An `ActorSet` describes N
actors of one class; it starts when a plan that uses it starts, on that plan's executor.

>>> class Counter:
...     def __init__(self, start=0):
...         self.n = start
...     def next(self):
...         self.n += 1
...         return self.n
>>> from flowrl.plan import Plan
>>> counters = ActorSet(Counter, num_actors=2, kwargs={"start": 10})
>>> with Plan(from_actors(counters, "next")) as plan:   # local executor by default
...     [plan.step()["output"] for _ in range(4)]
[11, 11, 12, 12]
"""

from __future__ import annotations

import collections
import inspect
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from flowrl.stream import OperatorError, Stream

if TYPE_CHECKING:
    from flowrl.plan import PlanContext


# ---- errors ----------------------------------------------------------------------------------
class RunError(RuntimeError):
    """A run cannot go on. The message is one line meant for the user, and `exit_code` is what
    `flowrl run` exits with: 1 for a fault while running (a checkpoint is written first), 2
    for a request that cannot be met (a cluster that cannot be joined, actors that cannot start
    or be placed)."""

    exit_code = 1


class ActorDiedError(RuntimeError):
    """An actor's process is gone; the actor set replaces it."""


class ActorFaultError(RunError):
    """Raised by an actor's method when the actor cannot go on although its process lives (its
    env raised, say). On Ray the actor set replaces the actor like a dead one, counting it in
    the plan counter named by `counter`; an actor in the calling process stops the run."""

    counter = "num_actor_faults"


class ActorFailedError(ActorDiedError):
    """A remote actor raised an ActorFaultError (kept in `fault`); it is replaced as if dead."""

    def __init__(self, fault: ActorFaultError):
        self.fault = fault
        super().__init__(str(fault))


class ActorRestartLimitError(RunError):
    """An actor set replaced more dead actors than its `max_restarts` allows."""


class ActorStartError(RunError):
    """An actor's constructor raised. Not a dead actor: starting it again would fail again."""

    exit_code = 2


class ActorPlacementError(RunError):
    """The cluster has not the resources for the actors asked for, or did not place them in time."""

    exit_code = 2


class ClusterConnectError(RunError):
    """The Ray cluster at the given address cannot be joined."""

    exit_code = 2


def find_run_error(error: BaseException | None) -> RunError | None:
    """The RunError behind `error` (an OperatorError holds its operator's error), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RunError):
            return error
        seen.add(id(error))
        error = getattr(error, "original", None) or error.__cause__
    return None


# ---- executors -------------------------------------------------------------------------------
class Executor:
    name = "executor"
    concurrent = False  # whether several things may make progress at once (threads, actors)

    def start(self) -> bool:
        """Make the executor ready; True when this call started something `close()` must end."""
        return False

    def close(self) -> None: ...

    def create_actor(self, cls: type, args: tuple, kwargs: dict, num_cpus: float, **options: Any) -> Any:
        """A new actor; `options` are the executor's own (Ray: actor options from `placement`)."""
        raise NotImplementedError

    def placement(self, name: str, strategy: str, num_actors: int, num_cpus: float, timeout_s: float) -> Any:
        """Where an actor set's actors go (flowrl.cluster.Placement on Ray, started); None here."""
        return None

    def submit(self, handle: Any, method: str, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def put(self, value: Any) -> Any:
        """`value` stored once for many calls (Ray's object store); locally, the value itself."""
        return value

    def wait(self, refs: list, timeout: float) -> list:
        """Some of `refs` that are ready (at least one unless `timeout` passed)."""
        raise NotImplementedError

    def get(self, ref: Any) -> Any:
        """The result of a call; raises `ActorDiedError` if the actor died."""
        raise NotImplementedError

    def kill(self, handle: Any, wait: bool = False) -> None:
        """End an actor; with `wait`, return only once it is seen dead."""
        raise NotImplementedError

    def wait_dead(self, handle: Any, timeout_s: float = 10.0) -> None:
        """Return once a killed actor is seen dead (at most `timeout_s`); local actors die at once."""

    def reserve(self, name: str, num_actors: int, num_cpus: float) -> None:
        """Claim CPUs for `num_actors` actors of `num_cpus` each before they are created;
        raises ActorPlacementError when the executor could never place them all."""

    def release(self, num_actors: int, num_cpus: float) -> None:
        """Give back what `reserve` claimed."""

    def wait_ready(self, handles: dict[str, Any], num_cpus: float, timeout_s: float) -> None:
        """Wait until the actors (by label) have been placed and constructed: ActorStartError
        when a constructor raised, ActorPlacementError after `timeout_s`. Local actors are
        built when created, so there is nothing to wait for."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()


class _LocalActor:
    def __init__(self, instance: Any):
        self.instance = instance
        self.dead = False
        # Like a Ray actor, one call at a time (a learner thread may call while the driver does).
        self.lock = threading.Lock()


class _LocalCall:
    """A call on a local actor, run when its result is asked for, so nothing runs ahead of
    the consumer and the order of calls is deterministic."""

    __slots__ = ("actor", "method", "args", "kwargs")

    def __init__(self, actor: _LocalActor, method: str, args: tuple, kwargs: dict):
        self.actor, self.method, self.args, self.kwargs = actor, method, args, kwargs


class LocalExecutor(Executor):
    """Everything in the calling process, deterministic, no Ray."""

    name = "local"

    def create_actor(self, cls, args, kwargs, num_cpus, **options):
        return _LocalActor(cls(*args, **kwargs))

    def submit(self, handle, method, args, kwargs):
        return _LocalCall(handle, method, args, kwargs)

    def wait(self, refs, timeout):
        return refs[:1]

    def get(self, ref: _LocalCall):
        if ref.actor.dead:
            raise ActorDiedError("local actor was killed")
        with ref.actor.lock:
            return getattr(ref.actor.instance, ref.method)(*ref.args, **ref.kwargs)

    def kill(self, handle: _LocalActor, wait: bool = False):
        handle.dead = True
        close = getattr(handle.instance, "close", None)
        if callable(close):
            close()


class RayExecutor(Executor):
    """Actors are Ray actors. Joins the cluster at `address` when given (or one already
    initialized in this process); otherwise starts a local Ray with `num_cpus` and no dashboard,
    and shuts it down on `close()`. Joining gives up after `connect_timeout_s` (default: the
    environment's FLOWRL_CONNECT_TIMEOUT_S, else 30 s) with one line saying why."""

    name = "ray"
    concurrent = True

    def __init__(self, num_cpus: int | None = None, address: str | None = None, quiet: bool = True,
                 connect_timeout_s: float | None = None, runtime_env: dict | None = None):
        self.num_cpus = num_cpus
        self.address = address
        self.quiet = quiet
        self.connect_timeout_s = connect_timeout_s
        self.runtime_env = runtime_env  # the Ray job's when joining `address` (flowrl.cluster.runtime_env_for)
        self._started_ray = False
        self._reserved_cpus = 0.0  # what the actor sets started here have claimed

    def start(self) -> bool:
        import ray

        if self.address:
            from flowrl.cluster import check_address

            check_address(self.address)  # Ray Client (ray://) is refused in one line, joined or not
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if not self.address:
            # A Ray started here has no dashboard to show task events or metrics; collecting them
            # costs every worker process CPU (about 2-3% of sampling throughput on 2 cores). Set
            # these variables yourself to keep them (or to change any default below).
            os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
            os.environ.setdefault("RAY_enable_metrics_collection", "0")
            # Sampled batches (a few hundred KB) come back inside the actor's reply rather than
            # through the object store, which saves the raylet work per batch (~5% throughput).
            os.environ.setdefault("RAY_max_direct_call_object_size", str(2 * 1024 * 1024))
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR",
                                  "log_to_driver": not self.quiet}
        if self.address:
            if self.runtime_env:
                kwargs["runtime_env"] = self.runtime_env
            join_cluster(self.address, connect_timeout(self.connect_timeout_s), **kwargs)
        else:
            ray.init(num_cpus=self.num_cpus or os.cpu_count(), **kwargs)
        self._started_ray = True
        return True

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def create_actor(self, cls, args, kwargs, num_cpus, **options):
        import ray

        remote_cls = ray.remote(cls) if not hasattr(cls, "remote") else cls
        return remote_cls.options(num_cpus=num_cpus, max_restarts=0, max_task_retries=0,
                                  **options).remote(*args, **kwargs)

    def placement(self, name, strategy, num_actors, num_cpus, timeout_s):
        from flowrl.cluster import Placement

        return Placement(name, strategy, num_actors, num_cpus).start(timeout_s)

    def reserve(self, name, num_actors, num_cpus):
        import ray

        # Ray would queue actors it cannot place and wait for ever: refuse up front what the
        # cluster could never hold, counting the actors this executor has started already.
        asked = num_actors * num_cpus
        total = ray.cluster_resources().get("CPU", 0.0)
        if asked and self._reserved_cpus + asked > total + 1e-9:
            held = f" besides the {self._reserved_cpus:g} its other actors hold" if self._reserved_cpus else ""
            raise ActorPlacementError(
                f"{num_actors} {name} actor{'s' if num_actors != 1 else ''} x {num_cpus:g} CPU = {asked:g} CPUs "
                f"asked for{held}, but the Ray cluster has {total:g} CPUs; lower num_workers or "
                "num_cpus_per_worker, or join a bigger cluster with --address")
        self._reserved_cpus += asked

    def release(self, num_actors, num_cpus):
        self._reserved_cpus = max(0.0, self._reserved_cpus - num_actors * num_cpus)

    def wait_ready(self, handles, num_cpus, timeout_s):
        import ray
        from ray.exceptions import RayActorError

        pending = {handle.__ray_ready__.remote(): label for label, handle in handles.items()}
        deadline = time.monotonic() + timeout_s
        while pending:
            # Short waits keep Ctrl-C responsive.
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(0.0, min(0.5, left)),
                                fetch_local=False)
            for ref in ready:
                label = pending.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    if getattr(e, "actor_init_failed", False):
                        raise ActorStartError(_start_failure(label, e)) from None
                    # Died for another reason (its node went away): its first call replaces it.
            if pending and left <= 0:
                total = ray.cluster_resources().get("CPU", 0.0)
                free = ray.available_resources().get("CPU", 0.0)
                raise ActorPlacementError(
                    f"{', '.join(pending.values())} not placed after {timeout_s:g} s: each asks for {num_cpus:g} "
                    f"CPU; the Ray cluster has {total:g} CPUs, {free:g} free now (others hold the rest); free "
                    "them, lower num_workers or num_cpus_per_worker, or raise actor_start_timeout_s")

    def submit(self, handle, method, args, kwargs):
        return getattr(handle, method).remote(*args, **kwargs)

    def put(self, value):
        import ray

        return ray.put(value)

    def wait(self, refs, timeout):
        import ray

        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=True)
        return ready

    def get(self, ref):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayActorError as e:
            raise ActorDiedError(str(e).splitlines()[0]) from None
        except RayTaskError as e:
            if isinstance(e.cause, ActorFaultError):
                raise ActorFailedError(e.cause) from None
            if isinstance(e.cause, RunError):
                raise e.cause from None  # a one-line message says it all
            # Re-raise the remote exception as its own type; its text carries the remote traceback.
            raise e.as_instanceof_cause() from None

    def kill(self, handle, wait: bool = False):
        import ray

        ray.kill(handle, no_restart=True)
        if wait:
            self.wait_dead(handle)

    def wait_dead(self, handle, timeout_s: float = 10.0) -> None:
        import ray
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # ray.kill lands asynchronously
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=1)
            except RayActorError:
                return
            except ray.exceptions.GetTimeoutError:
                continue
            time.sleep(0.02)


def _start_failure(label: str, error: BaseException) -> str:
    """One line from Ray's report of a constructor that raised: the exception (the last line of
    the remote traceback) and the node it ran on."""
    text = _ANSI.sub("", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    node = re.search(r"\bip=([^,)\s]+)", text)
    cause = lines[-1] if lines else "unknown error"
    hint = ("; code named module:Class must be importable on every node (ship it with Ray's runtime_env, "
            "py_modules or working_dir)") if "No module named" in cause or "cannot load entry point" in cause else ""
    return f"{label} could not start on node {node.group(1) if node else '?'}: {cause}{hint}"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ---- joining a Ray cluster -------------------------------------------------------------------
DEFAULT_CONNECT_TIMEOUT_S = 30.0
_JOIN_HINT = ("check the address (`ray start --head` prints it; `ray status` on a node shows it) and that the "
              "head runs, or use --address auto on a node of the cluster")
_TOKEN_HINT = ("copy the cluster's token (`ray get-auth-token` on the head) into ~/.ray/auth_token, or set "
               "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


def connect_timeout(seconds: float | None = None) -> float:
    """`seconds`, else FLOWRL_CONNECT_TIMEOUT_S from the environment, else 30."""
    if seconds is None:
        text = os.environ.get("FLOWRL_CONNECT_TIMEOUT_S")
        if not text:
            return DEFAULT_CONNECT_TIMEOUT_S
        try:
            seconds = float(text)
        except ValueError:
            raise ClusterConnectError(f"FLOWRL_CONNECT_TIMEOUT_S={text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ClusterConnectError(f"the connect timeout must be > 0 seconds, got {seconds:g}")
    return float(seconds)


def local_auth_token() -> str | None:
    """Where a Ray authentication token is found on this machine, in the order Ray reads them
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if os.path.isfile(os.path.expanduser(path)) else None
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return default if os.path.isfile(default) else None


def _enable_token_auth(token: str | None) -> None:
    """Ray (2.59+) turns token authentication on by itself only when it finds the cluster
    (address "auto"); a driver joining host:port must ask for it, or the head refuses it."""
    if token is None or "RAY_AUTH_MODE" in os.environ:
        return  # no token, or the user chose the mode
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config; it refreshes it the same way when it turns token mode on
    except (ImportError, AttributeError):
        pass  # a Ray without token authentication ignores the variable


def _unreachable(address: str, timeout_s: float) -> str | None:
    """Why no TCP connection opens to host:port within `timeout_s`, or None when one does.
    Ray itself retries a dead address for many minutes, deaf to Ctrl-C."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return "not a host:port address"
    try:
        from ray._private.services import resolve_ip_for_localhost

        host = resolve_ip_for_localhost(host)  # as Ray does: a head binds the node's IP, not 127.0.0.1
    except Exception:
        pass
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"unknown host {host!r}"
    except ConnectionRefusedError:
        return f"connection refused at {host}:{port} (nothing listens there)"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


class _CapturedStderr:
    """File descriptor 2 sent to a temporary file: while joining, Ray's C++ core logs a
    warning there for every retry; they become the reason in one line instead."""

    text = ""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError, AttributeError):
            self._saved = None  # no file descriptor 2 to borrow: leave it be
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


# ray.init threads given up on (timed out or interrupted): Ray's C++ client they leave behind
# can crash the interpreter's finalization, even once the thread has ended (flowrl.cli.entry).
abandoned_joins: list[threading.Thread] = []


def join_cluster(address: str, timeout_s: float, **init_kwargs: Any) -> None:
    """`ray.init(address=...)` that gives up within about `timeout_s` with a ClusterConnectError
    naming the address, the reason and what to try, and that takes a local token along."""
    import ray

    direct = address not in ("auto", "local") and not address.startswith("ray://")
    if direct:
        reason = _unreachable(address, timeout_s)
        if reason:
            raise ClusterConnectError(f"cannot join the Ray cluster at {address}: {reason}; {_JOIN_HINT}")
        _enable_token_auth(local_auth_token())
    # Ray tries the GCS about once a second, this many times (its default is 20).
    retries = "RAY_gcs_server_port_wait_time_s"
    chosen = os.environ.get(retries)
    if chosen is None:
        os.environ[retries] = str(max(1, math.ceil(timeout_s)))
    captured = _CapturedStderr()
    outcome: dict[str, BaseException] = {}

    def init() -> None:
        try:
            ray.init(address=address, **init_kwargs)
        except BaseException as e:
            outcome["error"] = e

    # In a thread, so that the wait is bounded and Ctrl-C is heard: a port that takes the TCP
    # connection but never answers keeps ray.init's C++ client waiting for minutes.
    joining = threading.Thread(target=init, name="ray-join", daemon=True)
    try:
        with captured:
            joining.start()
            deadline = time.monotonic() + timeout_s + 5  # Ray's own retries end first, with a reason
            while joining.is_alive() and time.monotonic() < deadline:
                joining.join(0.1)
    except BaseException:  # Ctrl-C while waiting
        abandoned_joins.append(joining)
        raise
    finally:
        if chosen is None:
            os.environ.pop(retries, None)
    if joining.is_alive():
        abandoned_joins.append(joining)
        raise ClusterConnectError(f"cannot join the Ray cluster at {address}: the port answers but no Ray GCS replied "
                                  f"within {timeout_s:g} s; {_JOIN_HINT}")
    error = outcome.get("error")
    if error is not None:
        if ray.is_initialized():
            ray.shutdown()
        if "InvalidAuthToken" in captured.text or "Unauthenticated" in captured.text:
            token = local_auth_token()
            given = f"the token from {token}" if token else "no token (none found on this machine)"
            reason = f"the cluster uses token authentication and refused {given}; {_TOKEN_HINT}"
        else:
            lines = [line for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
            reason = f"{type(error).__name__}: {lines[0] if lines else 'no message'}; {_JOIN_HINT}"
        raise ClusterConnectError(f"cannot join the Ray cluster at {address}: {reason}") from None
    # Joined after all: what Ray said is news, not noise (but for its note that a thread other
    # than the main one cannot set a SIGTERM handler).
    news = [line for line in captured.text.splitlines(keepends=True) if line.strip()
            and "SIGTERM handler is not set" not in line]
    sys.stderr.write("".join(news))


def make_executor(kind: str = "local", **kwargs: Any) -> Executor:
    """An executor by name: "local" or "ray" (kwargs: num_cpus, address, connect_timeout_s, runtime_env)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(**kwargs)
    raise ValueError(f"unknown executor {kind!r}; choose 'local' or 'ray'")


# ---- actor sets ------------------------------------------------------------------------------
class ActorSet:
    """`num_actors` actors of class `cls`, started on the plan's executor when the plan starts.

    If `cls.__init__` takes an `actor_index` argument it receives `index_offset` + 0..N-1 (for
    seeding). A dead
    actor is replaced by a new one built with the same arguments, at most `max_restarts` times
    in all, and so is a Ray actor that raised an ActorFaultError (counted also in the plan
    counter the error names); `on_replace` callbacks then run with the index (to resend
    weights, say), and `on_start` callbacks run once the actors are created.

    Starting checks that the executor can hold the actors at all, then waits up to
    `start_timeout_s` for them to be placed and constructed; a constructor that raises stops
    the plan with ActorStartError (it would only raise again if restarted). On Ray,
    `placement_strategy` lays the actors out over the nodes (flowrl.cluster: SPREAD, DEFAULT,
    PACK, STRICT_PACK, STRICT_SPREAD).
    """

    def __init__(self, cls: type, num_actors: int, args: Sequence = (), kwargs: dict | None = None,
                 name: str | None = None, max_restarts: int = 3, num_cpus_per_actor: float = 1.0,
                 index_offset: int = 0, start_timeout_s: float = 60.0, placement_strategy: str = "DEFAULT"):
        if num_actors < 0:
            raise ValueError("num_actors must be >= 0")
        self.cls = cls
        self.num_actors = num_actors
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.name = name or cls.__name__
        self.max_restarts = max_restarts
        self.num_cpus_per_actor = num_cpus_per_actor
        self.index_offset = index_offset
        self.start_timeout_s = start_timeout_s
        self.placement_strategy = placement_strategy
        self._placement: Any = None  # the executor's, while started
        self.num_restarts = 0
        self._counters: collections.Counter | None = None  # the plan's, for faults
        self._reserved = False
        self.on_replace: list[Callable[[int], None]] = []
        self.on_start: list[Callable[[], None]] = []
        self._executor: Executor | None = None
        self._handles: list[Any] = []
        self._latest: dict[str, dict[int, Any]] = {}  # foreach_latest: method -> actor index -> call in flight
        init = getattr(cls, "__init__", None)
        try:
            self._pass_index = init is not None and "actor_index" in inspect.signature(init).parameters
        except (TypeError, ValueError):
            self._pass_index = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, executor: Executor, counters: collections.Counter | None = None) -> None:
        if self._executor is executor:
            return
        if self._executor is not None:
            raise RuntimeError(f"actor set {self.name!r} is already running on another plan")
        self._executor = executor
        self._counters = counters
        try:
            executor.reserve(self.name, self.num_actors, self.num_cpus_per_actor)
            self._reserved = True
            self._placement = executor.placement(self.name, self.placement_strategy, self.num_actors,
                                                 self.num_cpus_per_actor, self.start_timeout_s)
            self._handles = [self._create(i) for i in range(self.num_actors)]
            self._wait_ready(range(self.num_actors))
        except BaseException:
            self.close()  # no actor left waiting for a place, or holding one
            raise
        for callback in self.on_start:
            callback()

    def _create(self, index: int) -> Any:
        kwargs = dict(self.kwargs, actor_index=index + self.index_offset) if self._pass_index else self.kwargs
        options = self._placement.options(index) if self._placement is not None else {}
        return self._executor.create_actor(self.cls, self.args, kwargs, self.num_cpus_per_actor, **options)

    def _wait_ready(self, indices) -> None:
        handles = {f"{self.name} actor {i + self.index_offset}": self._handles[i] for i in indices}
        self._executor.wait_ready(handles, self.num_cpus_per_actor, self.start_timeout_s)

    @property
    def started(self) -> bool:
        return self._executor is not None

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            raise RuntimeError(f"actor set {self.name!r} has not started; start the plan that uses it first")
        return self._executor

    def close(self) -> None:
        if self._executor is None:
            return
        for handle in self._handles:
            try:
                self._executor.kill(handle)
            except Exception:
                pass
        # Kill all first, then wait: an actor still alive after close() would take calls and CPUs.
        for handle in self._handles:
            try:
                self._executor.wait_dead(handle)
            except Exception:
                pass
        if self._placement is not None:
            self._placement.close()
            self._placement = None
        if self._reserved:
            self._executor.release(self.num_actors, self.num_cpus_per_actor)
            self._reserved = False
        self._handles = []
        self._latest = {}
        self._executor = None

    def __len__(self) -> int:
        return self.num_actors

    # ---- calls --------------------------------------------------------------------------------
    def submit(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.executor.submit(self._handles[index], method, args, kwargs)

    def get(self, index: int, ref: Any, method: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """The result of `ref`; when the actor died, replace it and call `method` again."""
        while True:
            try:
                return self.executor.get(ref)
            except ActorDiedError as e:
                self.replace(index, e)
                ref = self.submit(index, method, *args, **(kwargs or {}))

    def foreach(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every actor and wait for all results, in actor order."""
        refs = [self.submit(i, method, *args, **kwargs) for i in range(self.num_actors)]
        return [self.get(i, ref, method, args, kwargs) for i, ref in enumerate(refs)]

    def foreach_async(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call `method` on every actor without waiting for the results (on the local executor,
        where calls run when their result is asked for, they run now)."""
        if not self.executor.concurrent:
            self.foreach(method, *args, **kwargs)
            return
        for i in range(self.num_actors):
            self.submit(i, method, *args, **kwargs)

    def foreach_latest(self, method: str, *args: Any, **kwargs: Any) -> int:
        """Like foreach_async, for pushes of which only the latest counts (weights): an actor
        whose previous `method` call has not run yet (it is busy sampling) is skipped, and gets a
        later push, instead of working through a queue of pushes each replacing the last.
        Returns how many actors were called."""
        if not self.executor.concurrent:
            self.foreach(method, *args, **kwargs)
            return self.num_actors
        in_flight = self._latest.setdefault(method, {})
        called = 0
        for i in range(self.num_actors):
            ref = in_flight.get(i)
            if ref is not None and not self.executor.wait([ref], 0):
                continue
            in_flight[i] = self.submit(i, method, *args, **kwargs)
            called += 1
        return called

    def replace(self, index: int, error: ActorDiedError | None = None) -> None:
        """A new actor in place of actor `index`, which died (or failed: `error` says which)."""
        fault = error.fault if isinstance(error, ActorFailedError) else None
        if fault is not None and self._counters is not None:
            self._counters[fault.counter] += 1
        if self.num_restarts >= self.max_restarts:
            what = f"failed ({fault})" if fault is not None else "died"
            raise ActorRestartLimitError(
                f"{self.name} actor {index + self.index_offset} {what} and {self.num_restarts} restarts already "
                f"reached max_restarts={self.max_restarts}")
        try:
            self.executor.kill(self._handles[index])
        except Exception:
            pass
        self.num_restarts += 1
        for in_flight in self._latest.values():
            in_flight.pop(index, None)
        self._handles[index] = self._create(index)
        self._wait_ready([index])
        for callback in self.on_replace:
            callback(index)

    def kill(self, index: int) -> None:
        """Kill actor `index` (its process, on Ray). The next call on it finds it dead and
        replaces it. For fault-tolerance tests; returns once the actor is dead."""
        self.executor.kill(self._handles[index], wait=True)


# ---- sources over actors ---------------------------------------------------------------------
def from_actors(actors: ActorSet, method: str, *args: Any, max_in_flight: int = 2,
                name: str | None = None, **kwargs: Any) -> Stream:
    """Call `actors.<method>(*args)` again and again, yielding each result as it arrives.

    Each actor has at most `max_in_flight` calls outstanding; a new call is sent only when the
    consumer takes a result, so a slow consumer pauses the actors. On the local executor the
    actors are called in turn (round robin), one call at a time, deterministically.
    """
    return _ActorSource(actors, method, args, kwargs, max_in_flight, name or f"{actors.name}.{method}",
                        gather=False)


def gather_sync(actors: ActorSet, method: str, *args: Any, name: str | None = None,
                **kwargs: Any) -> Stream[list]:
    """Call `method` on every actor at once and yield the list of results, in actor order, once
    all have answered (lock-step)."""
    return _ActorSource(actors, method, args, kwargs, 1, name or f"{actors.name}.{method}[sync]", gather=True)


class _ActorSource(Stream):
    def __init__(self, actors: ActorSet, method: str, args: tuple, kwargs: dict, max_in_flight: int,
                 name: str, gather: bool):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        super().__init__(name)
        self.actors, self.method, self.args, self.kwargs = actors, method, args, kwargs
        self.max_in_flight = max_in_flight
        self.gather = gather

    def _iterate(self, ctx: "PlanContext") -> Iterator:
        ctx.start_actors(self.actors)
        try:
            if self.gather:
                yield from self._gather()
            elif not ctx.executor.concurrent:
                yield from self._round_robin()
            else:
                yield from self._as_ready(ctx)
        except (OperatorError, RunError):
            raise
        except Exception as e:
            raise OperatorError(self.name, e) from e

    def _call(self, index: int) -> Any:
        return self.actors.submit(index, self.method, *self.args, **self.kwargs)

    def _result(self, index: int, ref: Any) -> Any:
        return self.actors.get(index, ref, self.method, self.args, self.kwargs)

    def _gather(self):
        while True:
            yield self.actors.foreach(self.method, *self.args, **self.kwargs)

    def _round_robin(self):
        while True:
            for i in range(self.actors.num_actors):
                yield self._result(i, self._call(i))

    def _as_ready(self, ctx):
        executor = self.actors.executor
        # An actor runs its calls in order, so when any of its calls is ready its oldest one is
        # too: taking that one keeps each actor's items in order.
        pending = [collections.deque() for _ in range(self.actors.num_actors)]
        owner: dict[Any, int] = {}

        def call(index: int) -> None:
            ref = self._call(index)
            pending[index].append(ref)
            owner[ref] = index

        for _ in range(self.max_in_flight):
            for i in range(self.actors.num_actors):
                call(i)
        while owner:
            ready = executor.wait(list(owner), timeout=0.2)  # a timeout keeps Ctrl-C responsive
            if not ready:
                continue
            index = owner[ready[0]]
            ref = pending[index].popleft()
            del owner[ref]
            try:
                item = executor.get(ref)
            except ActorDiedError as e:
                # Every call still in flight on the dead actor fails too; drop them all.
                for other in pending[index]:
                    del owner[other]
                pending[index].clear()
                self.actors.replace(index, e)
                for _ in range(self.max_in_flight):
                    call(index)
                continue
            yield item
            # Only now, with the item taken by the consumer, ask this actor for another.
            call(index)
