"""gem3d.models.precision: reduced-precision sampling scopes for the UNet, with a stated tolerance against float32."""
from __future__ import annotations

import pytest
import torch

from gem3d.models import precision
from gem3d.inference import cli
from gem3d.models.unet import TimestepEmbedSequential, UNetModel
from tests import _tiny_models

# bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4 %); through a tiny UNet the error stays within 3 % of the
# output's scale, fp16 (11 bits) within 0.5 %
TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}


def tiny_unet(volumetric: bool) -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(in_channels=12, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                     attention_resolutions=[2], num_head_channels=16, volumetric=volumetric).eval()
    with torch.no_grad():  # non-zero everywhere, the zero-initialised output convs included
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return unet


@pytest.mark.parametrize("volumetric", [False, True])
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_reduced_precision_matches_fp32_within_tolerance(name, volumetric):
    unet = tiny_unet(volumetric)
    x = torch.randn(2, 4, 12, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        reference = unet(x, t)
        with precision.sampling_precision(name):
            reduced = unet(x, t)
        again = unet(x, t)
    assert reduced.dtype == torch.float32  # the sampler's schedule arithmetic stays float32
    assert torch.equal(again, reference)  # the scope ends with the block
    error = (reduced - reference).abs().max() / reference.abs().max()
    assert 0 < error < TOLERANCE[name], f"{name}: relative max error {error:.3g}"


def test_fp32_and_auto_on_the_cpu_are_exactly_float32():
    unet = tiny_unet(volumetric=False)
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([3, 400])
    assert precision.default_precision("cpu") == "fp32"
    with torch.no_grad():
        reference = unet(x, t)
        for name in ("fp32", "auto"):
            with precision.sampling_precision(name):
                assert torch.equal(unet(x, t), reference), name


def test_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"\['auto', 'bf16', 'fp16', 'fp32'\], got 'half'"):
        with precision.sampling_precision("half"):
            pass


def test_cli_takes_precision():
    parser = cli.build_parser("demo", "ic")
    assert parser.parse_args([]).precision == "auto"
    assert parser.parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "half"])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def dtypes_inside_the_unet(tiny, out, *flags) -> tuple[set, set]:
    """Run the demo ``test`` script's entry point (1 case, 1 DDIM step) and return the dtypes that the UNet's blocks
    (:class:`TimestepEmbedSequential`) put out, and the CPU autocast dtypes seen inside them (``None``: autocast
    off)."""
    block_dtypes, autocast_dtypes = set(), set()

    def record(module, args, output):
        if isinstance(module, TimestepEmbedSequential):
            block_dtypes.add(output.dtype)
            autocast_dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        code = cli.main("demo", "test", ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]),
                                         "--out", str(out), "--steps", "1", "--cases", "1", "--no-progress",
                                         "--no-previews", *flags])
    finally:
        handle.remove()
    assert code == 0
    return block_dtypes, autocast_dtypes


def test_the_precision_flag_reaches_the_unet(tiny, tmp_path):
    """``--precision bf16`` runs the UNet's blocks under bfloat16 autocast; the default (``auto``, fp32 on the CPU)
    and ``fp32`` leave them in float32 with autocast off."""
    blocks, autocast = dtypes_inside_the_unet(tiny, tmp_path / "bf16", "--precision", "bf16")
    assert blocks == {torch.bfloat16} and autocast == {torch.bfloat16}
    for name, flags in (("auto", ()), ("fp32", ("--precision", "fp32"))):
        blocks, autocast = dtypes_inside_the_unet(tiny, tmp_path / name, *flags)
        assert blocks == {torch.float32} and autocast == {None}, name
