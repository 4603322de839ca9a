"""bench/: every registered section resolves to a function run_all can call, and the cheap ones run end to end at
toy sizes through ``run_all.main`` and write a block with its required parts (title with the device, command,
machine line, peak-memory method, table, notes, section wall time). No timing is asserted."""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402

TINY = dict(in_channels=12, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=32)


def block_text(path: Path, key: str) -> str:
    match = re.search(rf"<!-- bench:{key} -->\n(.*?)\n<!-- /bench:{key} -->", path.read_text(), re.S)
    assert match, f"no block {key} in {path}:\n{path.read_text()}"
    return match.group(1)


def assert_measured_block(text: str, title: str, command: str) -> list[str]:
    """The parts every measured block has; returns its table rows."""
    lines = text.splitlines()
    assert lines[0] == f"### {title} (CPU)"
    assert lines[2].startswith(f"`{command}` · ")
    assert "· torch " in lines[2] and "· threads " in lines[2] and "· CPU · peak memory: peak RSS" in lines[2]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) >= 3 and set(table[1]) <= {"|", "-"}
    assert re.search(r"^- Section wall time \d+ s; load average \(1 min\) [\d.]+ at its start, [\d.]+ at its end\.$",
                     text, re.M)
    return table[2:]


def test_every_section_resolves_to_a_function_that_takes_run_alls_arguments(tmp_path):
    args = argparse.Namespace(demo_out=tmp_path, work=tmp_path, out=tmp_path / "BENCHMARKS.md")
    for name in run_all.SECTIONS:
        function = run_all.section_function(name)
        inspect.signature(function).bind("cpu", True, **run_all.section_options(name, args))
    assert set(run_all.DEFAULT) <= set(run_all.SECTIONS) and run_all.DEFAULT[-1] == "targets"


def test_render_names_device_command_machine_and_memory_method():
    info = {"device": "CPU", "machine": "x86_64, 2 CPU cores", "date": "2026-01-02 03:04", "torch": "2.13.0",
            "threads": "1"}
    text = run_all.render("latent_cache", "cpu", [{"what": "a", "time": "1 ms"}], info, "python bench/x.py", ["n."])
    assert text.splitlines() == [
        "<!-- bench:cpu:latent_cache -->",
        "### 6. Latent cache: each case encoded once, training steps without the encoder (CPU)", "",
        f"`python bench/x.py` · x86_64, 2 CPU cores · 2026-01-02 03:04 · torch 2.13.0 · threads 1 "
        f"(OMP_NUM_THREADS={run_all.os.environ.get('OMP_NUM_THREADS', 'unset')}) · CPU · peak memory: "
        f"{run_all.MEMORY_METHOD['cpu']}", "",
        "| what | time |", "|---|---|", "| a | 1 ms |", "", "- n.", "", "<!-- /bench:cpu:latent_cache -->"]
    scheduled = run_all.render("latent_cache", "cpu", [], {**info, "scheduling": "SCHED_RR priority 1"}, "c", [])
    assert ") · scheduling SCHED_RR priority 1 · CPU · peak memory: " in scheduled.splitlines()[3]


def test_write_blocks_replaces_its_own_block_and_inserts_a_new_one_in_section_order(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    keys = ("cpu:unet", "cpu:quality_steps", "cpu:batch")
    out.write_text("# intro\n\n" + "\n\n".join(f"<!-- bench:{k} -->\nold {k}\n<!-- /bench:{k} -->" for k in keys)
                   + "\n\nprose after\n")
    placeholders = {run_all.block_key(kind, s) for kind in ("cpu", "gpu") for s in run_all.GPU_PLACEHOLDERS}
    run_all.write_blocks(out, {"bench:cpu:latent_cache": "<!-- bench:cpu:latent_cache -->\nnew\n"
                                                         "<!-- /bench:cpu:latent_cache -->",
                               "bench:cpu:batch": "<!-- bench:cpu:batch -->\nnew batch\n<!-- /bench:cpu:batch -->"})
    text = out.read_text()
    order = [text.index(f"<!-- bench:{k} -->") for k in ("cpu:unet", "cpu:quality_steps", "cpu:latent_cache",
                                                          "cpu:batch")]
    assert order == sorted(order)
    assert "old cpu:unet" in text and "old cpu:quality_steps" in text and "old cpu:batch" not in text
    assert "new batch" in text and text.startswith("# intro\n") and "prose after" in text
    for key in placeholders - {"bench:cpu:unet", "bench:cpu:batch"}:  # sections never measured: "Not measured"
        assert f"<!-- {key} -->" in text
    assert "Not measured (run `python bench/run_all.py --device cuda`)." in block_text(out, "gpu:unet")


@pytest.fixture
def toy_sizes(monkeypatch):
    """The UNet sections' configs and latent sizes shrunk to toy models, and the temporal-conv shapes to one."""
    import peers
    import segmenter_bench
    import temporal_conv_bench

    for name in list(peers.CONFIGS):
        monkeypatch.setitem(peers.CONFIGS, name, dict(TINY, volumetric=name.endswith("stage 2")))
    monkeypatch.setitem(peers.LATENT_SIZE, "paper", 8)
    monkeypatch.setitem(peers.LATENT_SIZE, "demo", 8)
    monkeypatch.setattr(temporal_conv_bench, "SHAPES", {"toy, 2 frames": (2, 8, 4)})
    monkeypatch.setattr(segmenter_bench, "SHAPE", (32, 32, 32))


@pytest.mark.parametrize("section", ["unet_paper", "profile", "temporal_conv", "segmenter"])
def test_section_runs_quick_at_toy_sizes_and_writes_its_block(section, toy_sizes, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--only", section, "--quick", "--out", str(out)]) == 0
    rows = assert_measured_block(block_text(out, f"cpu:{section}"), f"{run_all.SECTIONS[section][0]}",
                                 f"python bench/run_all.py --only {section} --quick")
    assert rows and all("nan" not in row for row in rows)


def test_targets_reads_the_blocks_it_finds(toy_sizes, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--only", "unet_paper,targets", "--quick", "--out", str(out)]) == 0
    text = block_text(out, "all:targets")
    assert text.startswith("### Targets, read from the sections' blocks\n\n`python bench/run_all.py --only "
                           "unet_paper,targets --quick` · ")
    rows = [line for line in text.splitlines() if line.startswith("| paper stage-1 forward")]
    assert len(rows) == 4 and sum("| section 1b (" in row for row in rows) == 2  # section 1b measured, 1 not
    assert sum(row.endswith("| section 1 | not measured |") for row in rows) == 2
    assert all(re.search(r"\| [\d.]+x time, [\d.]+x memory \| section 1b \(.*\) \| (not )?met \|$", row)
               for row in rows if "1b (" in row)


def test_quality_steps_without_demo_models_says_what_it_needs(tmp_path):
    with pytest.raises(SystemExit, match="--only quality_steps needs --demo-out DIR"):
        run_all.main(["--only", "quality_steps", "--out", str(tmp_path / "B.md")])
    with pytest.raises(SystemExit, match=r"--demo-out .*models/demo does not exist \(run `make demo` first\)"):
        run_all.main(["--only", "quality_steps", "--demo-out", str(tmp_path), "--out", str(tmp_path / "B.md")])


def test_latent_cache_script_writes_section_6(monkeypatch, tmp_path):
    """bench/latent_cache.py writes its block through run_all, here at toy sizes: one demo case, clips of 4 slices,
    the paper's KL-f8 on 64x64 slices."""
    import latent_cache

    for name in ("DEMO_CONFIG", "PAPER_CONFIG"):
        config = yaml.safe_load(getattr(latent_cache, name).read_text())
        config.pop("include", None)
        config["data"]["params"]["clip_len"] = 4
        config["data"]["params"].setdefault("preprocess", {"max_label": 3})["size"] = 64
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        monkeypatch.setattr(latent_cache, name, tmp_path / f"{name}.yaml")
    monkeypatch.setattr(latent_cache, "DEMO_CASES", 1)
    out = tmp_path / "BENCHMARKS.md"
    assert latent_cache.main(["--quick", "--out", str(out)]) == 0
    rows = assert_measured_block(block_text(out, "cpu:latent_cache"), run_all.SECTIONS["latent_cache"][0],
                                 "python bench/run_all.py --only latent_cache --quick")
    assert len(rows) == 6
    assert re.match(r"\| demo: encode one case into the cache \(48 slices of 64x64\) \| demo first stage, encoder "
                    r"[\d.]+ M parameters, 3 passes per slice \(image_mean, image_std, mask_mean, informed_mean, "
                    r"informed_std\) \| [\d.]+ m?s \| \d+ MiB \| \d+ MiB \(5 x 48x4x16x16 f32\) \|  \| 1 case \|$",
                    rows[0])
    assert "| encode every batch |" in rows[1] and "clip of 4x64x64" in rows[1]
    assert re.search(r"\| latent cache \| .*\| [\d.]+x time, [\d.]+x memory of encode every batch", rows[2])
    assert "155 slices x 2 passes (image_mean, image_std, mask_mean)" in rows[3] and "(3 x 155x4x8x8 f32)" in rows[3]
    assert "encode every batch: 9 slices (clip, masks, informed slice)" in rows[4]
    assert re.search(r"\| [\d.]+ ms \|  \|  \| 1/[\d,]+ of the time of encode every batch \| 20 \|$", rows[5])
    with pytest.raises(SystemExit, match="runs the latent_cache section only"):
        latent_cache.main(["--only", "unet"])


def test_interleaved_medians_runs_the_functions_in_abba_rounds():
    import common

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    medians = common.interleaved_medians(fns, repeats=4, device="cpu", warmup=0)
    assert "".join(calls) == "ABCCBAABCCBA"  # each first as often as last
    assert set(medians) == set("ABC") and all(v >= 0 for v in medians.values())
    assert common.abba_order(["A", "B"], 3) == [["A", "B"], ["B", "A"], ["A", "B"]]
