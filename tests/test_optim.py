"""gem3d.optim: Adam / AdamW with torch's fused kernel where the parameters allow it."""

import pytest
import torch

from gem3d.optim import fused_supported, make_adam


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 1, 1))


def _train(fused: bool, kind: str, steps: int = 5) -> list[torch.Tensor]:
    model = _model()
    optimizer = make_adam(kind, model.parameters(), fused=fused, lr=1e-2, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 2, 9, 9, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_fused_kernel_is_chosen_on_the_cpu_and_gives_the_loops_update(kind, cls):
    optimizer = make_adam(kind, _model().parameters(), lr=1e-3)
    assert type(optimizer) is cls and optimizer.defaults["fused"] is True
    assert make_adam(kind, _model().parameters(), fused=False, lr=1e-3).defaults["fused"] is None
    fused, loop = _train(True, kind), _train(False, kind)
    assert any(not torch.equal(a, b) for a, b in zip(fused, [p.detach() for p in _model().parameters()]))
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_is_not_chosen_where_torch_has_no_kernel():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert fused_supported(cpu)
    assert not fused_supported([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not fused_supported(cpu + [torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not fused_supported([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


def test_bad_kind_and_empty_parameters_are_refused():
    with pytest.raises(ValueError, match=r"optimiser kind 'sgd' is not one of \['adam', 'adamw'\]"):
        make_adam("sgd", _model().parameters())
    with pytest.raises(ValueError, match="no parameters to optimise"):
        make_adam("adam", [])
