"""flowrl.optim.Adam: the update worked out by hand, the same parameters as torch.optim.Adam
(fused) step for step, torch's state_dict layout both ways, and no torch._dynamo import."""

import io
import math
import subprocess
import sys

import pytest
import torch

from flowrl.optim import Adam


def test_two_steps_by_hand():
    # lr 0.1, b1 0.9, b2 0.999, eps 1e-8; gradients 0.5 then -1.0 on theta_0 = 1.
    # t=1: m = 0.05, v = 0.00025; m^ = 0.5, v^ = 0.25: theta = 1 - 0.1 * 0.5 / 0.5 = 0.9.
    # t=2: m = 0.045 - 0.1 = -0.055, v = 0.00024975 + 0.001 = 0.00124975;
    #      m^ = -0.055 / 0.19, v^ = 0.00124975 / 0.001999: theta = 0.9 - 0.1 m^ / sqrt(v^).
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = Adam([p], lr=0.1)
    for g in (0.5, -1.0):
        p.grad = torch.tensor([g])
        opt.step()
    expected = 0.9 - 0.1 * (-0.055 / 0.19) / math.sqrt(0.00124975 / 0.001999)
    assert p.item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.936610, abs=1e-6)
    state = opt.state_dict()["state"][0]
    assert state["step"].item() == 2 and state["exp_avg"].item() == pytest.approx(-0.055, rel=1e-6)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _grads(net, seed):
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed))
    net.zero_grad(set_to_none=True)
    net(x).pow(2).mean().backward()


def test_steps_as_torch_fused_adam_with_groups_and_a_changed_lr():
    ours, theirs = _net(), _net()
    groups = lambda net: [{"params": list(net[0].parameters())}, {"params": list(net[2].parameters()), "lr": 0.01}]
    opt = Adam(groups(ours), lr=3e-3, eps=1e-5)
    ref = torch.optim.Adam(groups(theirs), lr=3e-3, eps=1e-5, fused=True)
    for step in range(5):
        if step == 3:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 1e-3
        for net, o in ((ours, opt), (theirs, ref)):
            _grads(net, step)
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def _through_a_file(state_dict):
    """As a checkpoint holds it: saved, then loaded with weights_only."""
    f = io.BytesIO()
    torch.save(state_dict, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dicts_load_into_the_other(direction):
    first, second = _net(), _net()
    make_ours = lambda net: Adam(net.parameters(), lr=1e-2)
    make_torch = lambda net: torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    make_first, make_second = (make_ours, make_torch) if direction == "ours_to_torch" else (make_torch, make_ours)
    opt = make_first(first)
    for step in range(3):
        _grads(first, step)
        opt.step()
    second.load_state_dict(first.state_dict())
    opt2 = make_second(second)
    opt2.load_state_dict(_through_a_file(opt.state_dict()))
    for step in range(3, 5):
        for net, o in ((first, opt), (second, opt2)):
            _grads(net, step)
            o.step()
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_a_state_of_other_shapes_is_refused():
    opt = Adam(_net().parameters(), lr=1e-2)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    other_opt = Adam(other.parameters(), lr=1e-2)
    _grads(other, 0)
    other_opt.step()
    with pytest.raises(ValueError, match="parameter 0 has shape"):
        opt.load_state_dict(other_opt.state_dict())


def test_stepping_does_not_import_dynamo():
    code = ("import sys, torch; from flowrl.optim import Adam; p = torch.nn.Parameter(torch.ones(2)); "
            "o = Adam([p], lr=0.1); p.grad = torch.ones(2); o.step(); o.zero_grad(); o.state_dict(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
