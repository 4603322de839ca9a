"""Small helpers shared by the training modules: latent-diffusion's lr rule and image grids."""

from __future__ import annotations

import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["LearningRateRule", "image_grid", "log_image_grids"]


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message, flush=True)


class LearningRateRule:
    """``set_learning_rate`` for the training modules, which hold ``base_learning_rate`` and ``scale_lr``."""

    def set_learning_rate(self, ngpu: int, batch_size: int, accumulate: int = 1) -> float:
        """Set ``learning_rate`` (with ``scale_lr`` by latent-diffusion's rule, ``accumulate * ngpu * batch_size *
        base_learning_rate``), print latent-diffusion's message and return it."""
        base = self.base_learning_rate
        if self.scale_lr:
            for name, value in (("ngpu", ngpu), ("batch_size", batch_size), ("accumulate", accumulate)):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive int, got {value!r}")
            self.learning_rate = float(accumulate * ngpu * batch_size * base)
            _print_rank_zero(
                f"Setting learning rate to {self.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) * {ngpu} "
                f"(num_gpus) * {batch_size} (batchsize) * {base:.2e} (base_lr)"
            )
        else:
            self.learning_rate = base
            _print_rank_zero(f"++++ NOT USING LR SCALING ++++\nSetting learning rate to {self.learning_rate:.2e}")
        return self.learning_rate


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of grey slices ``(F, 1, H, W)`` in about [-1, 1] -> one image ``(1, R*H, F*W)`` in [0, 1]."""
    stacked = torch.stack([r.detach().float().cpu() for r in rows])
    grid = rearrange(stacked, "r f 1 h w -> 1 (r h) (f w)")
    return ((grid.clamp(-1, 1) + 1) / 2).contiguous()


def log_image_grids(module, grids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``{tag: (1, H, W)}`` grids to the module's TensorBoard logger (if it is one); returns ``grids``."""
    experiment = getattr(module.logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_image"):
        for tag, image in grids.items():
            experiment.add_image(f"images/{tag}", image, global_step=module.global_step)
    return grids
