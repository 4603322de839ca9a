import hashlib
import json

import numpy as np
import pytest

from gem3d.export.manifest import Manifest, make_record, merge_manifests, record_key
from gem3d.files import file_sha256


def record(case, setting="icma", sample=0, seconds=np.float32(1.5), **extra):
    return make_record(
        case, setting, sample, seed=1000 + sample,
        informed={"source": "case_b", "index": 12, "position": 0.4},
        mask_edits=[{"edit": "rotate", "degrees": [1.0, -2.0, 0.5]}],
        sampler="ddim", steps=25, checkpoint_sha256="ab" * 32, seconds=seconds,
        files={"image": f"{setting}/{case}_s{sample}_image.nii.gz"}, **extra,
    )


def test_add_has_and_reload(tmp_path):
    path = tmp_path / "run" / "manifest.json"
    manifest = Manifest(path)
    assert len(manifest) == 0 and not path.exists()
    manifest.add(record("case_a", sample=0))
    manifest.add(record("case_a", sample=1, note=np.int64(7)))
    assert manifest.has(("case_a", "icma", 0))
    assert manifest.has({"case": "case_a", "setting": "icma", "sample": np.int64(1)})
    assert not manifest.has(("case_a", "ic", 0))
    assert manifest.has(("case_a", "icma", 1))

    reloaded = Manifest(path)
    assert reloaded.records == manifest.records
    assert [record_key(r) for r in reloaded.records] == [("case_a", "icma", 0), ("case_a", "icma", 1)]
    assert reloaded.records[1]["note"] == 7
    assert reloaded.records[1]["seconds"] == 1.5
    assert json.loads(path.read_text())["version"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json"]


def test_duplicate_key_needs_replace(tmp_path):
    manifest = Manifest(tmp_path / "m.json")
    manifest.add(record("a"))
    with pytest.raises(ValueError, match=r"already has a record for \('a', 'icma', 0\)"):
        manifest.add(record("a"))
    manifest.add(record("a", steps_note="again"), replace=True)
    assert len(Manifest(tmp_path / "m.json")) == 1
    assert Manifest(tmp_path / "m.json").records[0]["steps_note"] == "again"


def test_extend_adds_several_records_in_one_write(tmp_path, monkeypatch):
    manifest = Manifest(tmp_path / "m.json")
    manifest.add(record("a"))
    writes = []
    save = Manifest.save
    monkeypatch.setattr(Manifest, "save", lambda self: writes.append(1) or save(self))
    with pytest.raises(ValueError, match=r"already has a record for \('a', 'icma', 0\)"):
        manifest.extend([record("b"), record("a")])
    assert writes == [] and len(Manifest(tmp_path / "m.json")) == 1
    manifest = Manifest(tmp_path / "m.json")
    manifest.extend([record("a", steps_note="again"), record("b"), record("c")], replace=True)
    assert writes == [1]
    assert [r["case"] for r in Manifest(tmp_path / "m.json").records] == ["a", "b", "c"]
    assert Manifest(tmp_path / "m.json").records[0]["steps_note"] == "again"


def test_key_validation():
    assert record_key(("a", "ic", np.int32(2))) == ("a", "ic", 2)
    with pytest.raises(KeyError, match="sample"):
        record_key({"case": "a", "setting": "ic"})
    with pytest.raises(ValueError, match="non-negative"):
        record_key(("a", "ic", -1))
    with pytest.raises(ValueError, match=r"\(case, setting, sample\)"):
        record_key(("a", 0))


def test_merge_per_rank_manifests(tmp_path):
    rank0, rank1 = Manifest(tmp_path / "rank0.json"), Manifest(tmp_path / "rank1.json")
    rank0.add(record("case_b", sample=0))
    rank0.add(record("case_a", sample=1))
    rank1.add(record("case_a", sample=0))
    rank1.add(record("case_a", sample=1))  # identical duplicate collapses
    merged = merge_manifests([rank0.path, rank1.path], tmp_path / "all.json")
    expected = [("case_a", "icma", 0), ("case_a", "icma", 1), ("case_b", "icma", 0)]
    assert [record_key(r) for r in merged.records] == expected
    assert Manifest(tmp_path / "all.json").records == merged.records
    only_rank0 = merge_manifests([rank0.path], tmp_path / "r0.json")
    assert [record_key(r) for r in only_rank0.records] == [("case_a", "icma", 1), ("case_b", "icma", 0)]

    rank1.add(record("case_b", sample=0, seconds=99.0))
    with pytest.raises(ValueError, match=r"conflicting records for \('case_b', 'icma', 0\)"):
        merge_manifests([rank0.path, rank1.path], tmp_path / "all.json")
    assert len(Manifest(tmp_path / "all.json")) == 3
    with pytest.raises(FileNotFoundError, match="missing.json"):
        merge_manifests([tmp_path / "missing.json"], tmp_path / "x.json")


def test_corrupt_manifest_is_reported(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest(tmp_path / "m.json")


def test_file_sha256_streams(tmp_path):
    data = np.random.default_rng(0).bytes(3 * 1024 + 17)
    (tmp_path / "ckpt").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "ckpt") == expected
    assert file_sha256(tmp_path / "ckpt", chunk_size=100) == expected
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "nope")
