#!/usr/bin/env python
"""Training entry point, compatible with latent-diffusion's ``main.py`` flags.

    python main.py --base configs/latent-diffusion/demo_stage1.yaml -t [--gpus 0,1,] [-n NAME] [-l LOGDIR] [-s SEED] \
        [model.params.base_learning_rate=1e-5 lightning.trainer.max_steps=20 ...]
    python main.py -r LOGDIR_OR_CKPT -t [overrides ...]      # resume: config, global step, optimiser, EMA
    python main.py --base CONFIG -t -n NAME --resume-if-exists  # LOGDIR/NAME: resumed when it has a checkpoint

A run writes ``LOGDIR/<timestamp>_<name>/``: ``checkpoints/{last.ckpt, step-*.ckpt}``,
``configs/<timestamp>-project.yaml`` / ``-lightning.yaml`` and TensorBoard logs under ``tensorboard/``.
SIGUSR1 saves ``last.ckpt`` and goes on (under SLURM it then requeues the job, as Lightning's auto-requeue does, and
stops); SIGTERM saves it and exits cleanly. Of the step checkpoints the newest 3 are kept (``save_top_k`` in
``lightning.modelcheckpoint.params``). A bad config, path or target stops the run before it starts with one
``error:`` line and exit status 2, every config problem in it (``--debug``: the traceback).

Config layout: ``model: {target, params}``, ``data: {target, params}``, ``lightning: {trainer: {...},
modelcheckpoint: {params: {...}}, callbacks: {name: {target, params}}}``. A config file may ``include:`` other files
(paths relative to it), which it overrides: the paper's configs include their dataset block,
``configs/datasets/*.yaml`` (``data.params.dataset_dir`` and ``preprocess``). Every ``lightning.trainer`` key goes to
``lightning.Trainer`` as is (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``max_steps``, ...).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gem3d.checkpoint import resolve_checkpoint  # noqa: E402
from gem3d.config import (  # noqa: E402
    ALLOW_ANY_TARGET_FLAG, allow_any_target, check_config_targets, check_existing_path, check_params,
    error_line, instantiate_from_config, load_config_file, raise_problems,
)  # fmt: skip
from gem3d.denoiser import VARIANTS  # noqa: E402
from gem3d.training.faults import AtomicCheckpointIO, RandomStateCheckpoint  # noqa: E402
from gem3d.training.preemption import SignalCheckpoint  # noqa: E402

TOP_LEVEL_KEYS = ("model", "data", "lightning")
LIGHTNING_KEYS = ("trainer", "modelcheckpoint", "callbacks")
RUN_DIR_ENV = "GEM3D_RUN_LOGDIR"  # shared with the DDP child processes Lightning launches
PATH_KEYS = ("ckpt_path", "config_path")
# what a bad config, path, target or checkpoint raises before training starts: one line, exit status 2
STARTUP_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
                  NotImplementedError, pickle.UnpicklingError, MisconfigurationException)


# ---------------------------------------------------------------------------------------------- arguments


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="config files, merged left to right; trailing key=value overrides come last")
    parser.add_argument("-t", "--train", nargs="?", const=True, default=False, type=_str2bool, help="train")
    parser.add_argument("--gpus", type=str, default=None, help="GPU ids, e.g. '0,1,' (absent: CPU)")
    parser.add_argument("-r", "--resume", type=str, default="", help="resume from a run folder or a checkpoint")
    parser.add_argument("-n", "--name", type=str, default="", help="run name postfix (default: the first config's name)")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="with -n NAME: the run folder is LOGDIR/NAME (no timestamp), resumed when it holds a "
                             "checkpoint, so a requeued job (SLURM) finds its own run")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="folder holding the runs")
    parser.add_argument("-s", "--seed", type=int, default=23, help="global seed")
    parser.add_argument("-f", "--postfix", type=str, default="", help="appended to the run name")
    parser.add_argument(ALLOW_ANY_TARGET_FLAG, action="store_true",
                        help="let configs name any 'target:' (default: gem3d., torch., diffusers., lightning. only)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a start-up error")
    return parser


def _str2bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("yes", "true", "t", "y", "1"):
        return True
    if str(value).lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def _normalise_train_flag(argv: Sequence[str]) -> list[str]:
    """``-t`` followed by an override (``-t key=value``) means ``-t true``; ``-t false`` stays explicit."""
    out = list(argv)
    for i, token in enumerate(out):
        if token in ("-t", "--train"):
            following = out[i + 1] if i + 1 < len(out) else None
            if following is None or following.lower() not in ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"):
                out[i] = "--train=true"
    return out


def parse_gpus(gpus: str | None) -> list[int] | None:
    """``'0,1,'`` -> ``[0, 1]``; None/'' -> None (CPU)."""
    if gpus is None or str(gpus).strip() in ("", ","):
        return None
    try:
        return [int(g) for g in str(gpus).split(",") if g.strip() != ""]
    except ValueError as err:
        raise ValueError(f"--gpus={gpus!r}: expected comma-separated GPU ids such as '0,1,'") from err


# ---------------------------------------------------------------------------------------------- config


def load_config(paths: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """Merge the YAML files in order, then the dotlist ``overrides``; check the top-level layout."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--base config {path!r}: no such file")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ValueError(f"unrecognised arguments {bad}; overrides look like 'lightning.trainer.max_steps=20'")
    config = OmegaConf.merge(*[load_config_file(p) for p in paths], OmegaConf.from_dotlist(list(overrides)))
    check_config_targets(config, where="the config")  # before anything is built or imported
    return config


def layout_problems(config: DictConfig) -> list[Exception]:
    """The config's layout problems (unknown or missing sections), all of them."""
    problems: list[Exception] = []
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        problems.append(KeyError(f"unknown top-level config key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}"))
    for key in ("model", "data"):
        if key not in config:
            problems.append(KeyError(f"config has no '{key}' section (with target/params)"))
            continue
        node = config[key]
        extra = sorted(set(node.keys()) - {"target", "params", "base_learning_rate"})
        if "target" not in node or extra:
            problems.append(KeyError(f"config '{key}' must hold 'target' and 'params'; got keys {sorted(node.keys())}"))
    lightning_cfg = config.get("lightning") or {}
    unknown = sorted(set(lightning_cfg.keys()) - set(LIGHTNING_KEYS))
    if unknown:
        problems.append(KeyError(f"unknown 'lightning' config key(s) {unknown}; allowed: {list(LIGHTNING_KEYS)}"))
    return problems


def validate_config(config: DictConfig) -> None:
    raise_problems(layout_problems(config))


def check_config(config: DictConfig) -> None:
    """Every problem of a loaded config at once (:class:`ConfigProblems`; one problem raises as itself): unknown
    ``params`` keys of every ``target`` (imports the targets, which :func:`load_config` allowed), placeholder or
    missing paths, and a data kind that does not fit the variant; the layout (unknown sections) first."""
    problems = layout_problems(config)
    if any(key not in config for key in ("model", "data")):
        raise_problems(problems)
    problems += check_params(config.model, where="model") + check_params(config.data, where="data")
    for name, cb_cfg in ((config.get("lightning") or {}).get("callbacks") or {}).items():
        problems += check_params(cb_cfg, where=f"lightning.callbacks.{name}")
    problems += path_problems(config)
    try:
        check_variant_data(config)
    except ValueError as err:
        problems.append(err)
    raise_problems(problems)


def check_paths(config: DictConfig) -> None:
    """Fail at start-up on placeholder or missing paths, naming the key and the value (every bad path at once)."""
    raise_problems(path_problems(config))


def path_problems(config: DictConfig) -> list[Exception]:
    """The placeholder or missing paths of ``model`` (``ckpt_path``, ``config_path`` keys) and the dataset folder."""
    problems: list[Exception] = []

    def check(function, *args, **kwargs) -> None:
        try:
            function(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError) as err:
            problems.append(err)

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for key in node.keys():
                value = node[key]
                dotted = f"{prefix}.{key}" if prefix else str(key)
                if str(key) in PATH_KEYS and value is not None:
                    if str(key) == "ckpt_path":
                        check(resolve_checkpoint, value, key=dotted)
                    else:
                        check(check_existing_path, dotted, value, kind="path")
                else:
                    walk(value, dotted)

    walk(config.model, "model")
    data_params = config.data.get("params") or {}
    if "dataset_dir" in data_params:
        check(check_existing_path, "data.params.dataset_dir", data_params.dataset_dir, kind="directory")
    return problems


def check_variant_data(config: DictConfig) -> None:
    """The position variant reads slices, every other variant clips."""

    variant = (config.model.get("params") or {}).get("variant")
    kind = (config.data.get("params") or {}).get("kind", "clip")
    if variant in VARIANTS and VARIANTS[variant].data_kind != kind:
        raise ValueError(
            f"model.params.variant={variant!r} trains on {VARIANTS[variant].data_kind!r} batches but "
            f"data.params.kind={kind!r}; set data.params.kind={VARIANTS[variant].data_kind}"
        )


# ---------------------------------------------------------------------------------------------- run folder


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """``-r`` value -> (run folder, checkpoint file)."""
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume!r}: no such run folder or checkpoint")
    if path.is_file():
        if path.parent.name != "checkpoints":
            raise ValueError(f"--resume {resume!r}: a checkpoint must sit in <run>/checkpoints/")
        return path.parent.parent, path
    ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        ckpt = newest_step_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"--resume {resume!r}: the run folder has no checkpoints/last.ckpt")
    return path, ckpt


def remove_killed_writes(ckpt_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted (``.<name>.<random>.tmp.ckpt``, see
    :class:`AtomicCheckpointIO`); returns them."""
    stale = sorted(ckpt_dir.glob(".*.tmp.ckpt"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def newest_step_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest ``step-*.ckpt``: a run killed between writing its first step checkpoint and ``last.ckpt``."""
    steps = sorted(ckpt_dir.glob("step-*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    if steps:
        print(f"{ckpt_dir} has no last.ckpt: resuming from the newest step checkpoint {steps[-1].name}", flush=True)
    return steps[-1] if steps else None


def has_checkpoint(run_dir: Path) -> bool:
    """True when ``run_dir/checkpoints`` holds ``last.ckpt`` or a ``step-*.ckpt``."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    return (ckpt_dir / "last.ckpt").is_file() or any(ckpt_dir.glob("step-*.ckpt"))


def resolve_stable_run(opt: argparse.Namespace) -> Path | None:
    """``--resume-if-exists``: the run folder ``LOGDIR/NAME<postfix>`` (no timestamp, so a requeued job and every
    rank started by ``srun`` find the same one); None without the flag."""
    if not opt.resume_if_exists:
        return None
    if opt.resume:
        raise ValueError(f"--resume-if-exists finds the run by -n NAME; it cannot be combined with -r {opt.resume!r}")
    if not opt.name:
        raise ValueError("--resume-if-exists needs -n NAME: the run folder LOGDIR/NAME that a requeued job finds again")
    if any(c in opt.name for c in "/\\") or opt.name in (".", ".."):
        raise ValueError(f"-n {opt.name!r}: a run name is one folder name, without '/'")
    return Path(opt.logdir) / f"{opt.name}{opt.postfix}"


def make_run_dir(opt: argparse.Namespace, now: str) -> Path:
    if opt.name:
        name = opt.name
    elif opt.base:
        name = Path(opt.base[0]).stem
    else:
        name = ""
    return Path(opt.logdir) / f"{now}_{name}{opt.postfix}"


# ---------------------------------------------------------------------------------------------- callbacks


def build_trainer_kwargs(config: DictConfig, opt: argparse.Namespace) -> dict:
    """``lightning.trainer`` as Trainer kwargs, with ``--gpus`` and CPU defaults applied."""
    kwargs = dict(OmegaConf.to_container(config.get("lightning", {}).get("trainer", {}) or {}, resolve=True))
    gpus = parse_gpus(opt.gpus)
    if gpus is not None:
        kwargs["accelerator"] = "gpu"
        kwargs["devices"] = gpus
        if len(gpus) > 1:
            kwargs.setdefault("strategy", "ddp")
    else:
        kwargs.setdefault("accelerator", "cpu")
        kwargs.setdefault("devices", 1)
    devices = kwargs.get("devices")
    n_devices = len(devices) if isinstance(devices, (list, tuple)) else (int(devices) if str(devices).isdigit() else 1)
    if n_devices > 1:
        kwargs.setdefault("strategy", "ddp")
    return kwargs


def check_gpus_exist(gpus: list[int], flag: str) -> None:
    """``--gpus`` ids that this machine has, else ValueError naming the flag and the GPUs there are."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--gpus={flag!r}: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                         f"leave --gpus out to train on the CPU")
    missing = [g for g in gpus if not 0 <= g < count]
    if missing:
        raise ValueError(f"--gpus={flag!r}: no GPU {missing}; this machine has GPUs {list(range(count))}")


def resolve_strategy(strategy: Any) -> Any:
    """``"ddp"`` -> ``DDPStrategy(broadcast_buffers=False)``: the EMA shadow and the frozen first stage are buffers
    that are identical on every rank, so DDP need not re-broadcast them (a UNet-sized copy) every step."""
    if strategy == "ddp":

        return DDPStrategy(broadcast_buffers=False)
    return strategy


def with_atomic_checkpoints(plugins: Any) -> list:
    """The trainer's plugins plus :class:`AtomicCheckpointIO` (checkpoints written atomically, never with NaN
    weights), unless the config names a checkpoint IO of its own."""
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else ([] if plugins is None else [plugins])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def world_size(trainer: L.Trainer) -> int:
    """The processes that train together: ``num_nodes x devices`` (each with its own batch); printed."""
    size = int(trainer.num_nodes) * int(trainer.num_devices)
    if trainer.is_global_zero:
        print(f"world size {size} = {trainer.num_nodes} node(s) x {trainer.num_devices} device(s)", flush=True)
    return size


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run training; returns 0 on success (also after a SIGTERM-triggered clean stop), 2 after a start-up error
    (one ``error:`` line on stderr; ``--debug`` raises it instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except STARTUP_ERRORS as err:
        if "--debug" in argv or not getattr(err, "gem3d_startup", False):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


def run(argv: Sequence[str] | None = None):
    """Parse ``argv``, build model / data / trainer from the configs and fit (``-t``) or validate.
    Returns the ``lightning.Trainer`` (its ``.lightning_module``, ``.callback_metrics``, ``.global_step``)."""
    parser = get_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    opt, overrides = parser.parse_known_args(_normalise_train_flag(argv))
    with allow_any_target(opt.allow_any_target):
        try:
            trainer, model, data, ckpt_path, is_child = _start(opt, overrides)
        except STARTUP_ERRORS as err:
            err.gem3d_startup = True  # main() reports it in one line
            raise
        return _fit(trainer, model, data, ckpt_path, is_child, train=bool(opt.train))


def _start(opt: argparse.Namespace, overrides: Sequence[str]):
    """Configs, checks, run folder, trainer, model and data: ``(trainer, model, data, ckpt_path, is_child)``."""
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen first stage
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if opt.name and opt.resume:
        raise ValueError("-n/--name cannot be combined with -r/--resume (the run keeps its name); for a run that "
                         "resumes when it exists use -n NAME --resume-if-exists")
    gpus = parse_gpus(opt.gpus)
    if gpus is not None:
        check_gpus_exist(gpus, opt.gpus)
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    inherited_run_dir = os.environ.get(RUN_DIR_ENV)  # set: this is a DDP child process of rank 0
    is_child = bool(inherited_run_dir)
    ckpt_path = None
    base = list(opt.base)
    stable_run_dir = resolve_stable_run(opt)
    if stable_run_dir is not None and has_checkpoint(stable_run_dir):
        print(f"--resume-if-exists: resuming {stable_run_dir}", flush=True)
        opt.resume = str(stable_run_dir)
    if opt.resume:
        run_dir, ckpt = resolve_resume(opt.resume)
        ckpt_path = str(ckpt)
        if not inherited_run_dir:
            remove_killed_writes(ckpt.parent)
        saved = sorted(glob.glob(str(run_dir / "configs" / "*.yaml")))
        if not saved:
            raise FileNotFoundError(f"--resume {opt.resume!r}: no configs/*.yaml in {run_dir}")
        base = saved + base
    elif inherited_run_dir:
        run_dir = Path(inherited_run_dir)
    else:
        if not opt.base:
            raise ValueError("give at least one config with --base (or --resume a run)")
        run_dir = stable_run_dir or make_run_dir(opt, now)

    config = load_config(base, overrides)
    check_config(config)
    L.seed_everything(opt.seed, workers=True)

    trainer_kwargs = build_trainer_kwargs(config, opt)
    ckpt_dir = run_dir / "checkpoints"
    cfg_dir = run_dir / "configs"
    lightning_cfg = config.get("lightning") or OmegaConf.create()
    mc_params = dict(OmegaConf.to_container((lightning_cfg.get("modelcheckpoint") or {}).get("params") or {}, resolve=True))
    mc_params = {
        "dirpath": str(ckpt_dir),
        "filename": "step-{step:06d}",
        "auto_insert_metric_name": False,
        "save_last": True,
        "save_top_k": 3,  # the newest 3 step checkpoints (by step); -1 keeps them all
        "monitor": "step",
        "mode": "max",
        "every_n_train_steps": 1000,
        "enable_version_counter": False,  # last.ckpt is overwritten, never last-v1.ckpt
        **mc_params,
    }
    callbacks = [ModelCheckpoint(**mc_params), SignalCheckpoint(ckpt_dir), LearningRateMonitor(logging_interval="step"),
                 RandomStateCheckpoint()]
    for name, cb_cfg in (lightning_cfg.get("callbacks") or {}).items():
        try:
            callbacks.append(instantiate_from_config(cb_cfg))
        except Exception as err:
            raise type(err)(f"lightning.callbacks.{name}: {err}") from err
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    trainer_kwargs.setdefault("default_root_dir", str(run_dir))
    try:
        trainer = L.Trainer(**{**trainer_kwargs, "strategy": resolve_strategy(trainer_kwargs.get("strategy", "auto")),
                               "plugins": with_atomic_checkpoints(trainer_kwargs.get("plugins"))},
                            callbacks=callbacks, logger=logger)
    except (MisconfigurationException, RuntimeError) as err:  # e.g. accelerator=gpu where there is none
        keys = ("accelerator", "devices", "num_nodes", "strategy")
        shown = {k: trainer_kwargs[k] for k in keys if k in trainer_kwargs}
        raise ValueError(f"lightning.trainer {shown}: {err}") from err

    model = instantiate_from_config(config.model)
    if "base_learning_rate" in config.model:  # latent-diffusion puts it next to target/params
        model.base_learning_rate = float(config.model.base_learning_rate)
    data = instantiate_from_config(config.data)

    if hasattr(model, "set_learning_rate"):
        batch_size = int((config.data.get("params") or {}).get("batch_size", 1))
        accumulate = int(trainer_kwargs.get("accumulate_grad_batches", 1))
        model.set_learning_rate(ngpu=world_size(trainer), batch_size=batch_size, accumulate=accumulate)

    if trainer.is_global_zero and not is_child:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        cfg_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(config, resolve=True)  # the dataset block's values, not its references
        project = OmegaConf.create({k: resolved[k] for k in ("model", "data")})
        OmegaConf.save(project, cfg_dir / f"{now}-project.yaml")
        lightning_saved = OmegaConf.create({"lightning": resolved.get("lightning") or {}})
        OmegaConf.save(lightning_saved, cfg_dir / f"{now}-lightning.yaml")
        print(f"run folder: {run_dir}", flush=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return trainer, model, data, ckpt_path, is_child


def _fit(trainer, model, data, ckpt_path: str | None, is_child: bool, train: bool):
    try:
        if train:
            try:
                trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
            except SIGTERMException:
                print("SIGTERM: checkpoint saved, stopping", flush=True)
        else:
            trainer.validate(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if not is_child:
            os.environ.pop(RUN_DIR_ENV, None)
    return trainer


if __name__ == "__main__":
    sys.exit(main())
