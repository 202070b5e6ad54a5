"""flowrl.plans: built-in plans. Each is a config dataclass plus a plan-building function
`build(workers, config) -> Plan`; users name one ("PPO") or give their own as
"package.module:function" (its config is then `CommonConfig` unless the function has a
`config_class` attribute). Offline plans (BC, MARWIL) train from `config.input`; for them the
env is optional (used for evaluation), and `check_input(config, env_spaces)` vets the dataset
before a run starts. Plans that need a kind of env (DQN: Discrete actions, SAC: Box) vet its
spaces with `check_env(config, env_spaces)` when the plan file is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flowrl.config import CommonConfig
from flowrl.plans.a2c import A2CConfig, build_a2c_plan
from flowrl.plans.appo import APPOConfig, build_appo_plan
from flowrl.plans.dqn import DQNConfig, build_dqn_plan, check_dqn_env
from flowrl.plans.marwil import BCConfig, MARWILConfig, build_bc_plan, build_marwil_plan, check_input
from flowrl.plans.ppo import PPOConfig, build_ppo_plan
from flowrl.plans.sac import SACConfig, build_sac_plan, check_sac_env
from flowrl.policy import resolve_class


@dataclass
class PlanSpec:
    name: str
    config_class: type
    build: Callable
    check_input: Callable | None = None  # offline plans: vets config.input, returns the spaces
    check_env: Callable | None = None    # vets the config against the env's spaces (raises EnvError, ConfigError)


BUILTIN_PLANS = {
    "PPO": PlanSpec("PPO", PPOConfig, build_ppo_plan),
    "A2C": PlanSpec("A2C", A2CConfig, build_a2c_plan),
    "APPO": PlanSpec("APPO", APPOConfig, build_appo_plan),
    "BC": PlanSpec("BC", BCConfig, build_bc_plan, check_input),
    "MARWIL": PlanSpec("MARWIL", MARWILConfig, build_marwil_plan, check_input),
    "DQN": PlanSpec("DQN", DQNConfig, build_dqn_plan, check_env=check_dqn_env),
    "SAC": PlanSpec("SAC", SACConfig, build_sac_plan, check_env=check_sac_env),
}


def resolve_plan(name: str) -> PlanSpec:
    """A built-in plan by name (any case), or a user's "package.module:function"."""
    for key, spec in BUILTIN_PLANS.items():
        if key.lower() == name.lower():
            return spec
    build = resolve_class(name, {}, "plan") if ":" in name else None
    if build is None:
        import difflib

        close = difflib.get_close_matches(name.upper(), list(BUILTIN_PLANS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown plan {name!r}{hint} (built-in: {', '.join(BUILTIN_PLANS)}, "
                         "or 'package.module:function')")
    if not callable(build):
        raise ValueError(f"plan {name!r} is not a function")
    return PlanSpec(name, getattr(build, "config_class", CommonConfig), build)


__all__ = ["BUILTIN_PLANS", "PlanSpec", "resolve_plan", "PPOConfig", "A2CConfig", "APPOConfig", "BCConfig",
           "DQNConfig", "MARWILConfig", "SACConfig", "build_ppo_plan", "build_a2c_plan", "build_appo_plan",
           "build_bc_plan", "build_dqn_plan", "build_marwil_plan", "build_sac_plan"]
