"""Running on a Ray cluster of several nodes: where actors go, what code they get, what flowrl joins.

**Placement.** `worker_placement_strategy` (config) says how an actor set's actors are laid out
over the nodes:

- SPREAD (the default): one node after another (Ray's SPREAD scheduling), so that workers whose
  sampling waits on a simulator use every node, and a node lost takes as few of them as it can.
  On one node it places as DEFAULT does.
- DEFAULT: Ray's own choice, which fills the driver's node before it uses another.
- PACK, STRICT_PACK, STRICT_SPREAD: a placement group of one bundle per actor, with Ray's
  meaning: PACK as few nodes as fit, STRICT_PACK one node for all, STRICT_SPREAD a node per
  actor (a replacement that no node can take then waits, and stops the run after
  `actor_start_timeout_s`).

Actors started inside a placement group already (a Ray Tune trial's) stay in it whatever the
strategy: the trial reserved their resources, and leaving it could deadlock trials.

**User code.** Envs, models and plans named `module:Class` are imported by the driver from the
current directory or its `sys.path`; on a real cluster the other nodes have neither. When flowrl
joins a cluster (`--address`), it gives the Ray job a `runtime_env` that ships the directory each
such module was imported from (the first as `working_dir`, any other module as one of
`py_modules`), without `runs/`, `datasets/`, virtual environments and `.git`; built-in envs and
installed packages ship nothing, and neither does the driver of a Ray Job (`ray job submit
--working-dir .` shipped the code already). `config.runtime_env` (Ray's keys: working_dir,
py_modules, excludes, env_vars, pip) replaces that choice; `{}` ships nothing.

**Addresses.** `host:port` (the GCS) or `auto`; Ray Client (`ray://`) is refused with one line.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from flowrl.config import ConfigError
from flowrl.executors import ActorPlacementError, ClusterConnectError

PLACEMENT_STRATEGIES = ("SPREAD", "DEFAULT", "PACK", "STRICT_PACK", "STRICT_SPREAD")
_GROUP_STRATEGIES = ("PACK", "STRICT_PACK", "STRICT_SPREAD")  # these need a placement group
# Never worth shipping: run directories, recorded datasets, virtual environments, VCS data, caches.
DEFAULT_EXCLUDES = ["runs/", "datasets/", ".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/"]
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a submitted job
RUNTIME_ENV_KEYS = {"working_dir": str, "py_modules": list, "excludes": list, "env_vars": dict, "pip": list}


# ---- configuration ---------------------------------------------------------------------------
def check_cluster_config(strategy: Any, runtime_env: Any) -> None:
    """ConfigError for a placement strategy flowrl does not know or a runtime_env it cannot pass
    on (`config.worker_placement_strategy`, `config.runtime_env`)."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError("worker_placement_strategy", f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                                                       f"got {strategy!r}")
    if runtime_env is None:
        return
    for key, value in runtime_env.items():
        if key not in RUNTIME_ENV_KEYS:
            from flowrl.config import suggest

            raise ConfigError(f"runtime_env.{key}", f"unknown key{suggest(str(key), RUNTIME_ENV_KEYS)} (flowrl passes "
                                                    f"on {', '.join(RUNTIME_ENV_KEYS)})")
        kind = RUNTIME_ENV_KEYS[key]
        if not isinstance(value, kind):
            raise ConfigError(f"runtime_env.{key}", f"expected {'a string' if kind is str else 'a ' + kind.__name__}, "
                                                    f"got {value!r}")
        items = value.values() if kind is dict else value if kind is list else ()
        if any(not isinstance(item, str) for item in items):
            raise ConfigError(f"runtime_env.{key}", f"expected strings, got {value!r}")


# ---- placement -------------------------------------------------------------------------------
class Placement:
    """Where the actors of one actor set go on Ray: `options(index)` are the actor options for
    actor `index`. PACK, STRICT_PACK and STRICT_SPREAD reserve a placement group of one bundle of
    `num_cpus` per actor when started; `close()` gives it back."""

    def __init__(self, name: str, strategy: str, num_actors: int, num_cpus: float):
        self.name, self.strategy, self.num_actors, self.num_cpus = name, strategy, num_actors, num_cpus
        self.group = None
        self.inherited = False  # inside a placement group already (a Tune trial): actors stay there

    def start(self, timeout_s: float) -> "Placement":
        from ray.util import get_current_placement_group, placement_group

        self.inherited = get_current_placement_group() is not None
        if self.inherited or self.strategy not in _GROUP_STRATEGIES or not self.num_actors:
            return self
        self.group = placement_group([{"CPU": self.num_cpus}] * self.num_actors, strategy=self.strategy)
        deadline = time.monotonic() + timeout_s
        try:
            while not self.group.wait(timeout_seconds=min(0.5, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:  # short waits above keep Ctrl-C responsive
                    raise ActorPlacementError(
                        f"{self.num_actors} {self.name} actors ({self.num_cpus:g} CPU each) not placed "
                        f"{self.strategy} after {timeout_s:g} s: the cluster has {_alive_nodes()} node(s) "
                        f"{_strategy_needs(self.strategy)}; choose another worker_placement_strategy, or raise "
                        "actor_start_timeout_s")
        except BaseException:
            self.close()  # no group left holding CPUs (Ctrl-C included)
            raise
        return self

    def options(self, index: int) -> dict[str, Any]:
        if self.inherited:
            return {}
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group,
                                                                            placement_group_bundle_index=index)}
        return {"scheduling_strategy": "SPREAD"} if self.strategy == "SPREAD" else {}

    def close(self) -> None:
        if self.group is not None:
            from ray.util import remove_placement_group

            try:
                remove_placement_group(self.group)
            except Exception:
                pass  # Ray already shut down
            self.group = None


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _strategy_needs(strategy: str) -> str:
    return {"STRICT_SPREAD": "and STRICT_SPREAD needs a node with room for each actor",
            "STRICT_PACK": "and STRICT_PACK needs one node with room for all of them",
            "PACK": "with too little room free for them"}[strategy]


# ---- user code -------------------------------------------------------------------------------
def user_modules(env: str | None, config: Any, plan_name: str) -> list[str]:
    """The top-level modules of the code an experiment names as `module:Name`: its env, its
    custom model, its plan."""
    model = getattr(config, "model", None) or {}
    names = []
    for spec in (env, model.get("custom_model"), plan_name):
        if isinstance(spec, str) and ":" in spec:
            top = spec.split(":", 1)[0].split(".")[0]
            if top and top not in names and top != "__main__":  # __main__: Ray pickles its code by value
                names.append(top)
    return names


def _installed_roots() -> list[Path]:
    paths = [sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    paths += site.getsitepackages() + [site.getusersitepackages()]
    return [Path(p).resolve() for p in paths if p]


def module_location(top: str) -> tuple[Path, Path] | None:
    """(the directory `top` is imported from, its file or package directory) when it is user code:
    not flowrl, nor installed (site-packages), nor the standard library; else None."""
    if top == "flowrl":
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        item = Path(next(iter(spec.submodule_search_locations)))  # a package (a namespace one too)
    elif spec.origin and os.path.isfile(spec.origin):
        item = Path(spec.origin)
    else:
        return None  # built in
    item = item.resolve()
    if any(item.is_relative_to(root) for root in _installed_roots()):
        return None
    return item.parent, item


def runtime_env_for(env: str | None, config: Any, plan_name: str) -> dict[str, Any] | None:
    """The runtime_env of a Ray job that runs this experiment's workers on a cluster: the
    config's (`runtime_env`, paths made absolute), else one that ships the user code it names
    (module docstring); None when there is nothing to ship."""
    given = getattr(config, "runtime_env", None)
    if given is not None:
        runtime_env = dict(given)
        for key in ("working_dir", "py_modules"):
            paths = runtime_env.get(key)
            if paths is None:
                continue
            absolute = [_local_path(f"runtime_env.{key}", p) for p in ([paths] if isinstance(paths, str) else paths)]
            runtime_env[key] = absolute[0] if isinstance(paths, str) else absolute
    elif RAY_JOB_ENV in os.environ:
        return None  # a Ray Job's driver: the job's own runtime_env (`ray job submit --working-dir`) ships it
    else:
        found = [loc for loc in map(module_location, user_modules(env, config, plan_name)) if loc is not None]
        if not found:
            return None
        working_dir = found[0][0]
        runtime_env = {"working_dir": str(working_dir)}
        elsewhere = [str(item) for root, item in found if root != working_dir]
        if elsewhere:
            runtime_env["py_modules"] = elsewhere
    if not runtime_env:
        return None
    if "working_dir" in runtime_env or "py_modules" in runtime_env:
        runtime_env["excludes"] = DEFAULT_EXCLUDES + [e for e in runtime_env.get("excludes", [])
                                                      if e not in DEFAULT_EXCLUDES]
    return runtime_env


def _local_path(key: str, path: str) -> str:
    """`path` absolute (against the current directory); a URI (s3://, gs://, https://...) as is."""
    if "://" in path:
        return path
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(absolute):
        raise ConfigError(f"config.{key}", f"{path}: no such file or directory")
    return absolute


# ---- addresses -------------------------------------------------------------------------------
def check_address(address: str) -> None:
    """ClusterConnectError, one line, for an address flowrl does not join: Ray Client."""
    if address.startswith("ray://"):
        host = address[len("ray://"):].rsplit(":", 1)[0] or "HEAD"
        raise ClusterConnectError(
            f"cannot join the Ray cluster at {address}: Ray Client (ray://) is not supported (the learner runs in "
            f"this process, and every sampled batch and weight update would pass through the client's proxy); "
            f"on a machine of the cluster give the GCS address, --address {host}:6379 (the one `ray start --head` "
            f"prints) or --address auto, or submit the run as a Ray Job: ray job submit --address "
            f"http://{host}:8265 --working-dir . -- flowrl run PLAN.yaml --address auto")


def node_id() -> str | None:
    """The Ray node this process runs on, or None outside Ray."""
    ray = sys.modules.get("ray")  # not imported: not in Ray (and importing it costs a second)
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()
