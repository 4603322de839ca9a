"""11. The label-fidelity / downstream segmenter: one MONAI training step and one prediction, by memory format; a
sliding-window prediction, by windows per forward pass.

The segmenter (gem3d/segmentation/monai_backend.py) is MONAI's ``BasicUNet`` with 8-64 channels, trained on whole
48x64x64 demo volumes by the downstream experiment (the demo's label-fidelity segmenter trains on 32x48x48 patches
of them), where oneDNN's 3D convolution backward costs several times its forward. The backend keeps the network
and its inputs in ``channels_last_3d``; this section times a training step (forward, DiceCE loss, backward, Adam)
and a forward on the backend's own network and loss, in that format against the default (contiguous) one, from the
same weights, interleaved. Then the label-fidelity segmenter's
prediction of one demo volume: MONAI's ``sliding_window_inference`` over 32x48x48 windows (eight of them, overlap
0.25, Gaussian blending), one window per forward pass against the backend's ``sw_batch_size`` (4).
"""
from __future__ import annotations

import copy

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from common import fmt_seconds, interleaved_medians

from gem3d.segmentation import SegmenterSettings
from gem3d.segmentation.monai_backend import DEFAULTS, MEMORY_FORMAT, MonaiSegmenter

BATCH, LABELS, SHAPE = 2, 3, (48, 64, 64)  # the demo: batches of two whole volumes, three tumour labels
WINDOW = [32, 48, 48]  # the demo's label-fidelity segmenter (gem3d.demo.SEGMENTER_OPTIONS)


def _step_fn(network, image, label):
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss = loss_function(network(image), label)
        loss.backward()
        optimiser.step()
        return loss
    return step


def bench_segmenter(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    settings = SegmenterSettings(backend="monai", iterations=1, seed=0, device=device)
    network = MonaiSegmenter(settings, "unused")._build(LABELS)  # the backend's network, in MEMORY_FORMAT
    contiguous = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
    torch.manual_seed(0)
    image = torch.randn(BATCH, 1, *SHAPE, device=device)
    label = torch.randint(0, LABELS + 1, (BATCH, 1, *SHAPE), device=device)
    last_image = image.contiguous(memory_format=MEMORY_FORMAT)
    with torch.no_grad():
        difference = (network.eval()(last_image) - contiguous.eval()(image)).abs().max().item()
    repeats = 5 if quick else 15
    rows = []
    shape = f"{BATCH}x1x{'x'.join(map(str, SHAPE))}"
    for what, fns in (
            ("training step (forward, DiceCE, backward, Adam)",
             {"contiguous": _step_fn(contiguous.train(), image, label),
              "channels_last_3d": _step_fn(network.train(), last_image, label)}),
            ("forward (prediction)",
             {"contiguous": torch.no_grad()(lambda: contiguous.eval()(image)),
              "channels_last_3d": torch.no_grad()(lambda: network.eval()(last_image))})):
        seconds = interleaved_medians(fns, repeats, device)
        for variant, s in seconds.items():
            rows.append({"what": f"MONAI BasicUNet (8-64 channels), {what}, {shape}", "variant": variant,
                         "time": fmt_seconds(s),
                         "ratio": f"{s / seconds['contiguous']:.2f}x contiguous" if variant != "contiguous" else "",
                         "max abs difference": f"{difference:.1g}" if variant != "contiguous" else "",
                         "repeats": str(repeats)})
            print("  " + " | ".join(rows[-1].values()), flush=True)
    rows += _sliding_window_rows(network.eval(), last_image[:1], device, repeats)
    notes = ["max abs difference: the two formats' forward outputs from the same weights (float rounding only); "
             "for the sliding windows, the two ways' blended logits (the labels, their argmax, are compared too)"]
    return rows, notes


def _sliding_window_rows(network, volume, device: str, repeats: int) -> list[dict]:
    """One 1x1x48x64x64 volume predicted over :data:`WINDOW` windows, one per forward pass vs ``sw_batch_size``."""
    batched = DEFAULTS["sw_batch_size"]

    def predict(sw_batch_size: int):
        return torch.inference_mode()(lambda: sliding_window_inference(
            volume, roi_size=WINDOW, sw_batch_size=sw_batch_size, predictor=network, overlap=DEFAULTS["overlap"],
            mode="gaussian"))
    fns = {"1 window a pass": predict(1), f"{batched} windows a pass (the backend's)": predict(batched)}
    one, many = (fn() for fn in fns.values())
    difference = (one - many).abs().max().item()
    same_labels = bool(torch.equal(one.argmax(1), many.argmax(1)))
    seconds = interleaved_medians(fns, repeats, device)
    first = next(iter(seconds.values()))
    rows = []
    for i, (variant, s) in enumerate(seconds.items()):
        rows.append({"what": f"MONAI BasicUNet (8-64 channels), sliding-window prediction of 1x1x"
                             f"{'x'.join(map(str, SHAPE))}, {'x'.join(map(str, WINDOW))} windows",
                     "variant": variant, "time": fmt_seconds(s),
                     "ratio": f"{s / first:.2f}x one window a pass" if i else "",
                     "max abs difference": (f"{difference:.1g}, same labels: {'yes' if same_labels else 'NO'}"
                                            if i else ""),
                     "repeats": str(repeats)})
        print("  " + " | ".join(rows[-1].values()), flush=True)
    return rows
