"""latent-diffusion style ``target:`` / ``params:`` configs and start-up checks."""

from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

PLACEHOLDER_MARKERS = ("path-to", "path/to", "placeholder", "<", ">", "TODO", "CHANGE_ME", "???")


def to_plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dict/list (resolved); other values unchanged."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def get_obj_from_str(target: str) -> Any:
    """Import ``"pkg.module.Name"`` or ``"pkg.module.Class.classmethod"``; errors name the target."""
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"config target must be a dotted import path like 'gem3d.models.unet.UNetModel', got {target!r}")
    parts = target.split(".")
    # Longest importable module prefix, then attribute lookups (supports Class.classmethod).
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name) and err.name != module_name:
                raise ImportError(f"config target {target!r}: importing {module_name!r} failed: {err}") from err
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise ImportError(f"config target {target!r}: {module_name!r} has no attribute path {'.'.join(parts[split:])!r}") from err
        return obj
    raise ImportError(f"config target {target!r}: no importable module in it")


def instantiate_from_config(cfg: Mapping | DictConfig, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from ``{target: ..., params: {...}}``."""
    cfg = to_plain(cfg)
    if not isinstance(cfg, Mapping) or "target" not in cfg:
        raise KeyError(f"expected a mapping with a 'target' key (and optional 'params'), got {cfg!r}")
    unknown = set(cfg) - {"target", "params"}
    if unknown:
        raise KeyError(f"config for target {cfg['target']!r} has unknown keys {sorted(unknown)}; allowed: ['params', 'target']")
    factory = get_obj_from_str(cfg["target"])
    params = dict(cfg.get("params") or {})
    params.update(extra)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        signature = None
    if signature is not None and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        check_keys(params, [n for n in signature.parameters if n != "self"], f"params of target {cfg['target']!r}")
    try:
        return factory(**params)
    except TypeError as err:
        raise TypeError(f"instantiating target {cfg['target']!r} with params {sorted(params)} failed: {err}") from err


def check_keys(given: Mapping | Any, allowed, where: str) -> None:
    """Refuse keys of ``given`` that are not in ``allowed``, naming the closest allowed key and all of them."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown key {key!r} in {where}; {hint}allowed: {sorted(allowed)}")


def is_placeholder(value: Any) -> bool:
    """True for strings such as ``path-to-stage1-ckpt`` or ``<stage1>/last.ckpt``."""
    if not isinstance(value, str):
        return False
    low = value.lower()
    return any(marker.lower() in low for marker in PLACEHOLDER_MARKERS)


def check_existing_path(key: str, value: Any, *, kind: str = "file") -> Path:
    """Validate a path-valued config entry: fails naming ``key`` and ``value`` for placeholders or missing paths."""
    if value is None or value == "":
        raise ValueError(f"{key} is empty; set it to an existing {kind}")
    if is_placeholder(value):
        raise ValueError(f"{key}={value!r} is a placeholder; set it to an existing {kind} (e.g. '{key}=/path/to/run/checkpoints/last.ckpt' on the command line)")
    path = Path(str(value)).expanduser()
    if kind == "file" and not path.is_file():
        raise FileNotFoundError(f"{key}={value!r}: no such file")
    if kind == "directory" and not path.is_dir():
        raise FileNotFoundError(f"{key}={value!r}: no such directory")
    if kind == "path" and not path.exists():
        raise FileNotFoundError(f"{key}={value!r}: no such file or directory")
    return path
