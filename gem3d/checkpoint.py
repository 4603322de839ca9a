"""Safe checkpoint loading, shared by every loader in gem3d.

Checkpoints are read with ``torch.load(weights_only=True)`` and an allowlist of what Lightning / latent-diffusion
files hold; anything else stops with :class:`UnsafeCheckpointError`, which names the refused objects and the
``trust`` opt-in (``--trust-checkpoint``). Nothing is ever unpickled silently.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import glob
import os
import pathlib
import pickle
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from numpy._core import multiarray
from omegaconf import DictConfig, ListConfig, base, nodes
from safetensors.torch import load_file

from gem3d.config import check_existing_path, is_placeholder
from gem3d.ema import shadow_key


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects outside gem3d's allowlist; ``unsafe_globals`` names them."""

    def __init__(self, message: str, unsafe_globals: list[str]):
        super().__init__(message)
        self.unsafe_globals = unsafe_globals


def _placeholder(full_name: str) -> type:
    """An inert stand-in for a Lightning callback *class* (PL < 1.5 checkpoints use them as ``callbacks`` keys)."""
    module, _, name = full_name.rpartition(".")
    return type(name, (), {"__module__": module, "__qualname__": name})


def _dict_ignoring_factory(default_factory: Any = None) -> dict:
    """Stand-in for ``collections.defaultdict`` while unpickling: a plain dict (the factory is dropped)."""
    return {}


def checkpoint_allowlist() -> list[Callable | tuple[Callable, str]]:
    """The non-tensor globals of Lightning / latent-diffusion checkpoints that are safe to rebuild. Dict subclasses
    are read back as plain dicts (torch's safe unpickler fills only those), the callback classes that PL < 1.5 used
    as ``callbacks`` keys as inert placeholders."""
    allow: list[Callable | tuple[Callable, str]] = [
        typing.Any, collections.OrderedDict, argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
        pathlib.PureWindowsPath, np.ndarray, np.dtype, DictConfig, ListConfig, base.ContainerMetadata, base.Metadata,
        base.UnionNode, nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode,
        nodes.BytesNode, nodes.PathNode, nodes.ValueNode, nodes.InterpolationResultNode,
        (type(None), "builtins.NoneType"), (_dict_ignoring_factory, "collections.defaultdict"),
    ]
    allow += [(getattr(builtins, n), f"builtins.{n}") for n in
              ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bool", "object")]
    for name in ("pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
                 "lightning_fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.AttributeDict"):
        allow.append((dict, name))
    for package in ("pytorch_lightning", "lightning.pytorch"):
        for name in ("callbacks.model_checkpoint.ModelCheckpoint", "callbacks.early_stopping.EarlyStopping"):
            allow.append((_placeholder(f"{package}.{name}"), f"{package}.{name}"))
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x pickles name these
        allow += [(multiarray._reconstruct, f"{core}._reconstruct"), (multiarray.scalar, f"{core}.scalar")]
    allow += [(getattr(np.dtypes, name), f"numpy.dtypes.{name}")
              for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType")]
    return allow


def safe_load_checkpoint(path: str | Path, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``.ckpt`` / ``.pt`` file with ``torch.load(weights_only=True)`` and gem3d's allowlist; where that
    fails, unpickle fully if ``trust`` (only for files you trust), else raise :class:`UnsafeCheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with torch.serialization.safe_globals(checkpoint_allowlist()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            if trust:
                warnings.warn(f"{path}: not loadable with weights_only=True; unpickling it fully because trust=True")
                return torch.load(path, map_location=map_location, weights_only=False)
            try:  # every global outside torch's and gem3d's allowlists
                offending = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # legacy (non-zip) format or unreadable pickle: fall back to the error text
                offending = []
            offending = sorted(set(offending or re.findall(r"GLOBAL ([\w.]+)", str(error))))
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle {', '.join(offending) or 'objects'} — not on gem3d's allowlist of "
                f"checkpoint objects (weights_only=True failed: {str(error).splitlines()[0] if str(error) else error!r}"
                "). If you trust this file, load it with trust=True (command line: --trust-checkpoint); that unpickles "
                "it fully and can run arbitrary code.",
                offending,
            ) from error


def with_prefix(state_dict, prefix: str) -> dict:
    """The entries of ``state_dict`` whose names start with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def resolve_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> Path:
    """A checkpoint file from a file, a run folder (``<run>/checkpoints/last.ckpt``) or a glob (newest match,
    e.g. ``logs/*_demo_stage1``); placeholders and missing paths fail naming ``key`` and the value."""
    value = str(path)
    if is_placeholder(value):
        check_existing_path(key, value)  # raises with the placeholder message
    if any(ch in value for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(value)))
        if not matches:
            raise FileNotFoundError(f"{key}={value!r}: no file or folder matches this pattern")
        value = matches[-1]
    candidate = Path(value).expanduser()
    if candidate.is_dir():
        candidate = candidate / "checkpoints" / "last.ckpt"
        if not candidate.is_file():
            raise FileNotFoundError(f"{key}={str(path)!r}: folder has no checkpoints/last.ckpt")
        return candidate
    return check_existing_path(key, str(candidate))


def load_checkpoint(path: str | os.PathLike, key: str = "ckpt_path", trust: bool = False) -> Mapping:
    """Any checkpoint gem3d reads, on the CPU: ``path`` as :func:`resolve_checkpoint` takes it; ``.safetensors``
    files through safetensors, everything else through :func:`safe_load_checkpoint` (``trust``: see there)."""
    resolved = resolve_checkpoint(path, key)
    if resolved.suffix == ".safetensors":
        return load_file(str(resolved), device="cpu")
    return safe_load_checkpoint(resolved, trust=trust)


def state_dict_of(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint (Lightning ``state_dict`` or a bare state dict)."""
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint holds no tensors (keys: {sorted(checkpoint)[:10]})")
    return sd


def unet_state_dict(checkpoint: Mapping, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The UNet weights of a gem3d checkpoint (``unet.*``, or with ``use_ema`` the EMA shadow ``ema.*`` over them)
    or of an original GEM-3D / latent-diffusion one (``model.diffusion_model.*``)."""
    state_dict = state_dict_of(checkpoint)
    if use_ema:
        ema = {k: v for k, v in state_dict.items() if k.startswith("ema.") and k != "ema.num_updates"}
        if not ema:
            raise KeyError("use_ema=True but the checkpoint holds no EMA weights ('ema.*')")
        raw = with_prefix(state_dict, "unet.")
        return {name: ema.get("ema." + shadow_key(name), value) for name, value in raw.items()}
    for prefix in ("unet.", "model.diffusion_model."):
        found = with_prefix(state_dict, prefix)
        if found:
            return found
    raise KeyError(
        f"no UNet weights ('unet.*' or 'model.diffusion_model.*') among {len(state_dict)} keys, e.g. {list(state_dict)[:5]}"
    )


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)``, failing with one line that names the first missing,
    unexpected and differently shaped keys (``where``: the file or part the weights came from)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {tuple(v.shape)} vs the model's {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where}: the weights do not fit the model its config describes: {len(wrong)} with another shape "
            f"{wrong[:3]}, {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    module.load_state_dict(dict(state_dict), strict=True)
