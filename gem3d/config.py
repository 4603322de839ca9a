"""latent-diffusion style ``target:`` / ``params:`` configs and start-up checks.

A ``target:`` names code to run, so a config may name only callables under :data:`ALLOWED_TARGET_PACKAGES`
outside :data:`DENIED_TARGETS`, plus the original GEM-3D classes of :data:`ORIGINAL_TARGETS` (never imported).
The check runs before anything is imported; ``--allow-any-target`` (:func:`allow_any_target`) lifts it.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import types
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

PLACEHOLDER_MARKERS = ("path-to", "path/to", "placeholder", "<", ">", "TODO", "CHANGE_ME", "???")

ALLOWED_TARGET_PACKAGES = ("gem3d", "torch", "diffusers", "lightning")
# The original GEM-3D (latent-diffusion fork) classes its model folders name; read by gem3d.model_dirs, never imported.
ORIGINAL_TARGETS = frozenset({
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm_pseudo3D.LatentDiffusion",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "ldm.modules.diffusionmodules.openaimodel_pseudo3D.UNetModel",
    "ldm.models.autoencoder.AutoencoderKL",
    "ldm.modules.encoders.modules.PositionalEmbedder",
})
# Under the allowed packages, but they load files as code, compile, fetch or spawn: never a config target.
DENIED_TARGETS = (
    "torch.hub", "torch.load", "torch.serialization", "torch.jit", "torch.package", "torch.utils.cpp_extension",
    "torch.ops", "torch.library", "torch.classes", "torch.compile", "torch.distributed", "torch.multiprocessing",
    "torch.utils.data.datapipes", "diffusers.utils", "diffusers.pipelines", "diffusers.DiffusionPipeline",
    "diffusers.loaders", "lightning.fabric.utilities.cloud_io",
)
DENIED_ATTRIBUTES = ("from_pretrained", "load_from_checkpoint", "from_single_file")  # (down)load and unpickle files
ALLOW_ANY_TARGET_FLAG = "--allow-any-target"
ALLOW_ANY_TARGET_ENV = "GEM3D_ALLOW_ANY_TARGET"  # set by the flag, so that worker and DDP processes inherit it


class TargetNotAllowedError(ValueError):
    """A config names a ``target`` (or ``trust: true``) outside gem3d's allowlist."""


@contextlib.contextmanager
def allow_any_target(enabled: bool = True) -> Iterator[None]:
    """Within the block (and in processes started from it), configs may name any target."""
    previous = os.environ.get(ALLOW_ANY_TARGET_ENV)
    if enabled:
        os.environ[ALLOW_ANY_TARGET_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOW_ANY_TARGET_ENV, None)
        else:
            os.environ[ALLOW_ANY_TARGET_ENV] = previous


def any_target_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_TARGET_ENV) == "1"


def error_line(err: BaseException) -> str:
    """An error's message for a one-line ``error:`` report (``str(KeyError)`` would add quotes)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _refuse(target: str, where: str, why: str) -> TargetNotAllowedError:
    return TargetNotAllowedError(
        f"config target {target!r}{f' in {where}' if where else ''} is not allowed ({why}): configs may name callables "
        f"under {', '.join(p + '.' for p in ALLOWED_TARGET_PACKAGES)} and the original GEM-3D ldm. classes; pass "
        f"{ALLOW_ANY_TARGET_FLAG} to import it anyway (it runs code the config names: only for files you trust)"
    )


def _name_refusal(name: str) -> str | None:
    """Why the dotted ``name`` may not be a target, or None."""
    parts = name.split(".")
    if parts[0] not in ALLOWED_TARGET_PACKAGES:
        return f"{parts[0]!r} is not an allowed package"
    if any(part.startswith("_") for part in parts):
        return "private names are not allowed"
    denied = [d for d in DENIED_TARGETS if name == d or name.startswith(d + ".")]
    if denied or parts[-1] in DENIED_ATTRIBUTES:
        return f"{denied[0] if denied else parts[-1]} loads or runs code from files"
    return None


def check_target(target: Any, where: str = "") -> None:
    """Raise :class:`TargetNotAllowedError` unless ``target`` is allowed; imports nothing."""
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"config target must be a dotted import path like 'gem3d.models.unet.UNetModel', got {target!r}")
    if any_target_allowed() or target in ORIGINAL_TARGETS:
        return
    why = _name_refusal(target)
    if why:
        raise _refuse(target, where, why)


def _mappings(config: Any, path: str) -> Iterator[tuple[str, Mapping]]:
    """Every mapping nested in ``config`` (through dicts and lists), with its dotted path."""
    if isinstance(config, Mapping):
        yield path, config
        for key, value in config.items():
            yield from _mappings(value, f"{path}.{key}")
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _mappings(value, path)


def check_config_targets(config: Any, where: str = "") -> None:
    """:func:`check_target` for every ``target`` key anywhere in a config (dicts and lists, nested)."""
    for _, mapping in _mappings(to_plain(config), ""):
        if isinstance(mapping.get("target"), str):
            check_target(mapping["target"], where)


def _check_trust(params: Any, target: str) -> None:
    """A config may not switch on full unpickling (``trust: true``): only the command line may."""
    if any_target_allowed():
        return
    for path, mapping in _mappings(params, "params"):
        if mapping.get("trust"):
            raise TargetNotAllowedError(
                f"config for target {target!r} sets {path}.trust={mapping['trust']!r}; a config may not turn off safe "
                f"checkpoint loading: use --trust-checkpoint, or {ALLOW_ANY_TARGET_FLAG} for a config you trust"
            )


def _check_resolved(target: str, obj: Any) -> None:
    """What an allowed name resolved to is allowed too (no ``gem3d.x.os.system`` through an imported module)."""
    if any_target_allowed():
        return
    if isinstance(obj, types.ModuleType):
        raise _refuse(target, "", f"it resolves through the module {obj.__name__!r}")
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", ""))
    why = _name_refusal(f"{module}.{qualname}") if isinstance(module, str) else "it is not a class or function"
    if why:
        raise _refuse(target, "", f"it resolves to {module}.{qualname}: {why}")


def to_plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dict/list (resolved); other values unchanged."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def get_obj_from_str(target: str) -> Any:
    """Import ``"pkg.module.Name"`` or ``"pkg.module.Class.classmethod"``; errors name the target."""
    check_target(target)
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
                if isinstance(obj, types.ModuleType):  # an imported module, not a submodule import
                    _check_resolved(target, obj)
        except AttributeError as err:
            raise ImportError(f"config target {target!r}: {module_name!r} has no attribute path {'.'.join(parts[split:])!r}") from err
        _check_resolved(target, obj)
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
    check_config_targets(cfg)  # nested configs too, before anything is imported
    params = dict(cfg.get("params") or {})
    _check_trust(params, cfg["target"])
    factory = get_obj_from_str(cfg["target"])
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
    return isinstance(value, str) and any(marker.lower() in value.lower() for marker in PLACEHOLDER_MARKERS)


def check_existing_path(key: str, value: Any, *, kind: str = "file") -> Path:
    """Validate a path-valued config entry: fails naming ``key`` and ``value`` for placeholders or missing paths."""
    if value is None or value == "":
        raise ValueError(f"{key} is empty; set it to an existing {kind}")
    if is_placeholder(value):
        raise ValueError(f"{key}={value!r} is a placeholder; set it to an existing {kind} (e.g. '{key}=/path/to/run/checkpoints/last.ckpt' on the command line)")
    path = Path(str(value)).expanduser()
    exists, noun = {"file": (path.is_file, "file"), "directory": (path.is_dir, "directory"),
                    "path": (path.exists, "file or directory")}[kind]
    if not exists():
        raise FileNotFoundError(f"{key}={value!r}: no such {noun}")
    return path


class ConfigProblems(ValueError):
    """Several problems of one config, reported together (``problems``: the exceptions)."""

    def __init__(self, problems: list[BaseException]):
        self.problems = list(problems)
        listed = "; ".join(f"({i}) {error_line(p)}" for i, p in enumerate(self.problems, 1))
        super().__init__(f"{len(self.problems)} config problems: {listed}")


def raise_problems(problems: list[BaseException]) -> None:
    """Nothing for no problem, the problem itself for one, :class:`ConfigProblems` for several."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigProblems(problems)


def check_params(config: Any, where: str) -> list[Exception]:
    """The unknown ``params`` keys of every ``{target, params}`` mapping in ``config`` (nested ones too), as
    exceptions, without building anything (the targets are imported: check them with :func:`check_config_targets`
    first). A target that cannot be imported is a problem too."""
    problems: list[Exception] = []
    for path, mapping in _mappings(to_plain(config), where):
        target, params = mapping.get("target"), mapping.get("params")
        if not isinstance(target, str) or not isinstance(params, Mapping):
            continue
        try:
            signature = inspect.signature(get_obj_from_str(target))
        except ImportError as err:
            problems.append(err)
            continue
        except (TypeError, ValueError):  # builtins without a signature
            continue
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            continue
        try:
            check_keys(params, [n for n in signature.parameters if n != "self"], f"{path}.params (target {target!r})")
        except ValueError as err:
            problems.append(err)
    return problems


def load_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """One YAML config; its ``include:`` (a path or a list, relative to the file) is loaded first and overridden
    by the file itself, so several configs can share one block (``configs/datasets/*.yaml``)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ValueError(f"config include cycle: {chain}")
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig) or "include" not in config:
        return config
    includes = config.pop("include")
    includes = [includes] if isinstance(includes, str) else list(includes or [])
    parts = []
    for include in includes:
        included = (path.parent / str(include)).resolve()
        if not included.is_file():
            raise FileNotFoundError(f"{path}: include {str(include)!r}: no such file ({included})")
        parts.append(load_config_file(included, (*_seen, path)))
    return OmegaConf.merge(*parts, config)
