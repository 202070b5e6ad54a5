"""Multi-agent settings: which policies there are, which agent each policy controls, which learn.

A plan file's `config.multiagent` section:

    multiagent:
      policies: [pursuer, evader]        # or {name: {model: ..., lr: ..., plan: ...}}: per-policy settings
      policy_mapping: {"pursuer_*": pursuer, "evader_*": evader}
      policies_to_train: [pursuer]       # default: every policy

`policy_mapping` is a dict of glob -> policy (the first glob that matches, in order), "shared"
(every agent one policy, `shared` unless `policies` names another), "independent" (each agent
its own policy, named after the agent id) or "package.module:function" (called with the agent id
and the episode id). A policy's `plan` (PPO, DQN, ...) picks its policy class, the one that
plan's workers build (`policy_class_of`); a plan that trains several kinds of policy finds each
branch's policies with `policies_of_plan`. What can be checked without the env is checked by
`parse_multiagent`; what needs the env's agents by `MultiAgentSpec.resolve`. Each error is one
line naming the key.

>>> spec = parse_multiagent({"policies": ["a", "b"], "policy_mapping": {"red_*": "a", "blue_*": "b"}})
>>> setup = spec.resolve(["red_0", "blue_0"])
>>> setup.policy_ids, setup.mapping("blue_0", 7)
(['a', 'b'], 'b')
>>> spec.resolve(["red_0", "green_0"])
Traceback (most recent call last):
...
flowrl.config.ConfigError: config.multiagent.policy_mapping: agent 'green_0' maps to no policy
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowrl.config import ConfigError, suggest

KEY = "multiagent"
POLICY_SETTINGS = ("model", "lr", "plan")  # what a policy may set for itself
SHARED_POLICY = "shared"


@dataclass
class MultiAgentSetup:
    """The policies of one env: names in a fixed order, their settings, and the mapping."""

    policy_ids: list[str]
    settings: dict[str, dict[str, Any]]
    mapping: Callable[[str, int], str]
    policies_to_train: list[str]


@dataclass
class MultiAgentSpec:
    """`config.multiagent`, checked as far as it can be without the env."""

    policies: dict[str, dict[str, Any]] | None
    policy_mapping: str | dict[str, str]
    policies_to_train: list[str] | None = None
    _function: Callable[[str, int], str] | None = field(default=None, repr=False)

    def resolve(self, agents: list[str]) -> MultiAgentSetup:
        """The policies and mapping for an env whose agents are `agents` (its possible_agents)."""
        mapping = self.policy_mapping
        policies = self.policies
        key = f"config.{KEY}.policy_mapping"
        if mapping == "independent":
            policies = {a: (policies or {}).get(a, {}) for a in agents}
            for name in self.policies or {}:
                if name not in agents:
                    raise ConfigError(f"config.{KEY}.policies", f"policy {name!r}: no agent maps to it (independent"
                                      f" policies are named after the agents: {', '.join(agents)})")
            fn = _identity
        elif mapping == "shared":
            policies = policies or {SHARED_POLICY: {}}
            name = next(iter(policies))
            fn = lambda agent_id, episode_id: name  # noqa: E731
        elif isinstance(mapping, dict):
            policies = policies or {p: {} for p in mapping.values()}
            fn = _glob_mapping(mapping)
        else:
            fn = checked_mapping(self._function, policies, key)
        for agent in agents:
            if fn(agent, 0) is None:
                raise ConfigError(key, f"agent {agent!r} maps to no policy")
        if self._function is None:
            used = {fn(a, 0) for a in agents}
            for name in policies:
                if name not in used:
                    raise ConfigError(f"config.{KEY}.policies", f"policy {name!r}: no agent maps to it")
        ids = list(policies)
        to_train = self.policies_to_train if self.policies_to_train is not None else ids
        for name in to_train:
            if name not in policies:
                raise ConfigError(f"config.{KEY}.policies_to_train", f"{name!r} is not a policy" + suggest(name, ids))
        return MultiAgentSetup(ids, {p: dict(policies[p]) for p in ids}, fn, list(to_train))


def first_agents(agents: list[str], setup: MultiAgentSetup) -> dict[str, str]:
    """{policy id: the agent whose spaces it takes}: the first of `agents` mapped to it, or, for
    a policy no agent maps to at the start (a mapping function's), the first agent."""
    first: dict[str, str] = {}
    for agent in agents:
        first.setdefault(setup.mapping(agent, 0), agent)
    return {pid: first.get(pid, agents[0]) for pid in setup.policy_ids}


def policy_spaces(env: Any, setup: MultiAgentSetup) -> dict[str, dict[str, Any]]:
    """{policy id: obs/new_obs/actions spaces}: those of its `first_agents` agent, from which the
    rollout worker builds the policy."""
    out = {}
    for pid, agent in first_agents(list(env.possible_agents), setup).items():
        obs = env.observation_space(agent)
        out[pid] = {"obs": obs, "new_obs": obs, "actions": env.action_space(agent)}
    return out


def _identity(agent_id: str, episode_id: int) -> str:
    return agent_id


def _glob_mapping(globs: dict[str, str]) -> Callable[[str, int], str | None]:
    items = list(globs.items())

    def mapping(agent_id: str, episode_id: int) -> str | None:
        return next((policy for pattern, policy in items if fnmatch.fnmatchcase(agent_id, pattern)), None)

    return mapping


def checked_mapping(fn: Callable, policies: dict[str, Any], key: str) -> Callable[[str, int], str]:
    """A user's mapping function, whose answers are checked: a policy it names must be in
    `policies` (a live view: policies added later count)."""

    def mapping(agent_id: str, episode_id: int) -> str:
        name = fn(agent_id, episode_id)
        if name not in policies:
            raise ConfigError(key, f"maps agent {agent_id!r} to {name!r}, which is not a policy"
                                   + suggest(str(name), policies))
        return name

    return mapping


def parse_multiagent(data: Any) -> MultiAgentSpec:
    """`config.multiagent` checked: key names, types, policy names the mapping and
    policies_to_train refer to. Raises ConfigError with the key under `multiagent.`."""
    if not isinstance(data, dict):
        raise ConfigError(KEY, f"expected a mapping, got {data!r}")
    known = ("policies", "policy_mapping", "policies_to_train")
    for k in data:
        if k not in known:
            raise ConfigError(f"{KEY}.{k}", "unknown key" + suggest(str(k), known))
    if "policy_mapping" not in data:
        raise ConfigError(f"{KEY}.policy_mapping", "missing: a glob -> policy mapping, shared, independent or "
                                                   "package.module:function")
    policies = _parse_policies(data.get("policies"))
    mapping = data["policy_mapping"]
    function = None
    key = f"{KEY}.policy_mapping"
    if isinstance(mapping, dict):
        if not mapping:
            raise ConfigError(key, "must map at least one glob to a policy")
        for pattern, name in mapping.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key}.{pattern}", f"expected a policy name, got {name!r}")
            if policies is not None and name not in policies:
                raise ConfigError(f"{key}.{pattern}", f"{name!r} is not a policy" + suggest(name, policies))
    elif mapping in ("shared", "independent"):
        if mapping == "shared" and policies is not None and len(policies) != 1:
            raise ConfigError(f"{KEY}.policies", f"shared maps every agent to one policy; {len(policies)} are named")
    elif isinstance(mapping, str) and ":" in mapping:
        if policies is None:
            raise ConfigError(f"{KEY}.policies", f"needed with a mapping function ({mapping}): the policies it "
                                                 "may name")
        from flowrl.policy import resolve_class

        try:
            function = resolve_class(mapping, {}, "policy_mapping")
        except Exception as e:
            raise ConfigError(key, str(e).splitlines()[0]) from None
        if not callable(function):
            raise ConfigError(key, f"{mapping} is not a function")
    else:
        raise ConfigError(key, f"must be a glob -> policy mapping, shared, independent or package.module:function, "
                               f"got {mapping!r}")
    to_train = data.get("policies_to_train")
    if to_train is not None:
        if not isinstance(to_train, list) or not all(isinstance(n, str) for n in to_train):
            raise ConfigError(f"{KEY}.policies_to_train", f"expected a list of policy names, got {to_train!r}")
        named = policies if policies is not None else (set(mapping.values()) if isinstance(mapping, dict) else None)
        if named is not None:
            for name in to_train:
                if name not in named:
                    raise ConfigError(f"{KEY}.policies_to_train", f"{name!r} is not a policy" + suggest(name, named))
    return MultiAgentSpec(policies, mapping, to_train, function)


def _parse_policies(policies: Any) -> dict[str, dict[str, Any]] | None:
    key = f"{KEY}.policies"
    if policies is None:
        return None
    if isinstance(policies, list):
        if not policies or not all(isinstance(p, str) for p in policies):
            raise ConfigError(key, f"expected a non-empty list of policy names, got {policies!r}")
        if len(set(policies)) != len(policies):
            dup = next(p for p in policies if policies.count(p) > 1)
            raise ConfigError(key, f"{dup!r} is named twice")
        return {p: {} for p in policies}
    if not isinstance(policies, dict) or not policies:
        raise ConfigError(key, f"expected a list of names or a mapping name -> settings, got {policies!r}")
    out = {}
    for name, settings in policies.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}.{name}", f"expected a mapping of settings ({', '.join(POLICY_SETTINGS)}), "
                                               f"got {settings!r}")
        for k, v in settings.items():
            if k not in POLICY_SETTINGS:
                raise ConfigError(f"{key}.{name}.{k}", "unknown key" + suggest(str(k), POLICY_SETTINGS))
        if "lr" in settings and (isinstance(settings["lr"], bool) or not isinstance(settings["lr"], (int, float))
                                 or not settings["lr"] > 0):
            raise ConfigError(f"{key}.{name}.lr", f"must be a number > 0, got {settings['lr']!r}")
        if "model" in settings and not isinstance(settings["model"], dict):
            raise ConfigError(f"{key}.{name}.model", f"expected a mapping, got {settings['model']!r}")
        out[str(name)] = dict(settings)
        if "plan" in settings:
            out[str(name)]["plan"] = _plan_name(settings["plan"], f"{key}.{name}.plan")
    return out


def _plan_name(plan: Any, key: str) -> str:
    """A policy's `plan` as the plan registry spells it ("dqn" -> "DQN")."""
    from flowrl.plans import resolve_plan  # the plans sit above the core: imported when used

    if not isinstance(plan, str):
        raise ConfigError(key, f"expected a plan name such as PPO or DQN, got {plan!r}")
    try:
        return resolve_plan(plan).name
    except ValueError as e:
        raise ConfigError(key, str(e).splitlines()[0]) from None


def policy_class_of(settings: dict[str, Any], policy: str, policy_config: dict[str, Any] | None
                    ) -> tuple[str, dict[str, Any]]:
    """The policy class (a name in flowrl.policy.POLICY_CLASSES) and options a policy with these
    settings is built with. Without `plan`: the run's (`policy`, `policy_config`). With one: the
    class that plan's workers build (PPO: TorchPolicy, DQN: QPolicy), with the run's options when
    the run builds that class too, else with that plan's defaults."""
    if "plan" not in settings:
        return policy, dict(policy_config or {})
    from flowrl.plans import resolve_plan

    cls, options = resolve_plan(settings["plan"]).config_class().policy_spec()
    return (cls, dict(policy_config or {})) if cls == policy else (cls, options)


def policies_of_plan(multiagent: dict[str, Any], plan: str) -> list[str]:
    """The policies of `config.multiagent` whose `plan` setting is `plan` (any case), in order."""
    policies = parse_multiagent(multiagent).policies or {}
    return [name for name, settings in policies.items() if settings.get("plan", "").lower() == plan.lower()]


def check_policy_plans(setup: MultiAgentSetup, plan: str) -> None:
    """A built-in plan trains every policy with its own loss: a policy to train whose `plan` is
    another is an error (a custom plan combines plans, as examples/ppo_dqn_multiagent.py does)."""
    for pid in setup.policies_to_train:
        other = setup.settings[pid].get("plan", plan)
        if other != plan:
            raise ConfigError(f"config.{KEY}.policies.{pid}.plan",
                              f"{other}, but run: {plan} trains every policy to train with {plan}'s loss; "
                              "combine plans in a plan of your own (examples/ppo_dqn_multiagent.py)")
