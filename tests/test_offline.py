"""No code path touches the network: the command lines run with every socket connection and name lookup refused."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from _tiny_models import tiny_setup
from gem3d import convert as convert_cli
from gem3d.data import check
from gem3d.export.manifest import Manifest
from gem3d.inference import cli as inference_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402
from tests.test_main import CONFIGS, only_run, write_tiny_dataset  # noqa: E402


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every attempt to connect or resolve a name raises and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access blocked by the test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo"), (socket, "gethostbyname")):
        monkeypatch.setattr(owner, name, refuse)
    with pytest.raises(OSError, match="blocked"):  # the block is in place
        socket.create_connection(("example.org", 80))
    attempts.clear()
    return attempts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_inference_and_conversion_run_offline(tiny, tmp_path, no_network, capsys):
    code = inference_cli.main("demo", "ic", ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]),
                                             "--out", str(tmp_path / "out"), "--steps", "2", "--cases", "1",
                                             "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert len(Manifest(tmp_path / "out" / "ic" / "manifest.json").records) == 1
    assert convert_cli.main([str(tiny["volume_stage"]), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / "weights.safetensors").is_file()
    assert no_network == []


def test_dataset_check_runs_offline(tiny, no_network, capsys):
    assert check.main([str(tiny["data"]), "--min-slices", "4"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("OK ")
    assert no_network == []


def test_a_training_step_runs_offline(tmp_path, no_network):
    dataset = write_tiny_dataset(tmp_path / "Dataset999_Tiny", cases=2)
    trainer = main_module.run([
        "--base", str(CONFIGS / "demo_autoencoder.yaml"), "-t", "-l", str(tmp_path / "logs"),
        f"data.params.dataset_dir={dataset}", "data.params.batch_size=2", "data.params.samples_per_epoch=2",
        "data.params.preprocess.size=32", "data.params.num_workers=0", "lightning.trainer.max_steps=1",
        "lightning.trainer.enable_progress_bar=false", "lightning.trainer.limit_val_batches=1",
    ])
    assert trainer.global_step == 1
    assert (only_run(tmp_path / "logs") / "checkpoints" / "last.ckpt").is_file()
    assert no_network == []
