"""Adam (Kingma and Ba 2015) for the learners, on torch's fused kernel but without
torch.optim.Optimizer.

torch.optim.Optimizer's methods are wrapped to keep torch.compile out of them, and the first
call of one imports torch._dynamo: about 1.1 s on this project's machine, an eighth of a PPO
run on CartPole from process start. This class calls the kernel torch.optim.Adam(fused=True)
calls (`torch._fused_adam_`, on CPU and CUDA), so the arithmetic is torch's, and it reads and
writes torch's state_dict layout (per parameter index: `step`, `exp_avg`, `exp_avg_sq`; the
groups' settings), so a checkpoint holds the same tensors whichever wrote it.

    m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2
    theta_t = theta_{t-1} - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

>>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
>>> opt = Adam([p], lr=0.1)
>>> p.grad = torch.tensor([0.5, -4.0])
>>> opt.step()            # the first step moves each weight by lr against its gradient's sign
>>> p.detach()
tensor([ 0.9000, -1.9000])
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

# Steps taken by every Adam in this process (policy_stack re-stacks its weight copies after one:
# the fused kernel writes parameters without bumping their version counters).
steps_taken = 0

_GROUP_DEFAULTS = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                   "differentiable": False, "fused": True, "decoupled_weight_decay": False}


class Adam:
    """Adam over `params` (tensors, or groups: dicts with "params" and optional "lr"), with
    torch.optim's attributes the learners use: `param_groups` (each a dict whose "lr" may be
    set between steps), `state`, `zero_grad`, `step`, `state_dict`, `load_state_dict`."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        groups = list(params)
        if not groups:
            raise ValueError("Adam got no parameters")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict[str, Any]] = [
            {"lr": lr, "betas": tuple(betas), "eps": eps, **_GROUP_DEFAULTS, **group, "params": list(group["params"])}
            for group in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        global steps_taken
        for group in self.param_groups:
            # the kernel takes tensors of one device and dtype per call
            by_kind: dict[tuple, tuple[list, ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if not state:
                    state = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                lists = by_kind.setdefault((p.device, p.dtype), ([], [], [], [], []))
                for out, x in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    out.append(x)
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs, exp_avg_sqs, steps in by_kind.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                                   beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], maximize=False,
                                   grad_scale=None, found_inf=None)
        steps_taken += 1

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters by their index over all groups in order."""
        index: dict[torch.Tensor, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(p, len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[p]: dict(s) for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state_dict from this class or from torch.optim.Adam over parameters of the same
        shapes in the same order; each tensor moves to its parameter's device (`step` stays
        float32)."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or \
                any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("the optimizer state holds a different number of parameter groups or parameters")
        params = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            if not all(isinstance(s.get(k), torch.Tensor) for k in ("exp_avg", "exp_avg_sq")):
                raise TypeError(f"the optimizer state of parameter {i} lacks exp_avg or exp_avg_sq tensors")
            if s["exp_avg"].shape != p.shape:
                raise ValueError(f"the optimizer state of parameter {i} has shape {tuple(s['exp_avg'].shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            self.state[p] = {"step": torch.as_tensor(s["step"], dtype=torch.float32).to(p.device).reshape(()).clone(),
                             "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone()}
        for s, g in zip(saved, self.param_groups):
            g.update({k: v for k, v in s.items() if k in ("lr", "betas", "eps")})
            g["betas"] = tuple(g["betas"])
