"""Run manifests: one JSON file of sample records (:func:`make_record`), keyed by ``(case, setting, sample)`` and
rewritten atomically after every sample; a resumed run skips keys it already ``has``. Each data-parallel rank writes
its own manifest; :func:`merge_manifests` joins them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from gem3d.files import atomic_write_json, json_default

__all__ = ["Manifest", "make_record", "record_key", "merge_manifests", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1
KEY_FIELDS = ("case", "setting", "sample")


def record_key(record_or_key: Mapping[str, Any] | Iterable[Any]) -> tuple[str, str, int]:
    """``(case, setting, sample)`` from a record dict or a 3-tuple, with types normalised."""
    if isinstance(record_or_key, Mapping):
        missing = [k for k in KEY_FIELDS if k not in record_or_key]
        if missing:
            raise KeyError(f"record lacks key field(s) {missing}; a record needs {list(KEY_FIELDS)}, got keys {sorted(record_or_key)}")
        parts = [record_or_key[k] for k in KEY_FIELDS]
    else:
        parts = list(record_or_key)
        if len(parts) != 3:
            raise ValueError(f"a manifest key is (case, setting, sample), got {tuple(parts)!r}")
    case, setting, sample = parts
    if isinstance(sample, bool) or int(sample) != sample or int(sample) < 0:
        raise ValueError(f"sample index must be a non-negative int, got {sample!r}")
    return str(case), str(setting), int(sample)


def make_record(case: str, setting: str, sample: int, seed: int, *, informed: Mapping[str, Any] | None = None,
                mask_edits: list[Mapping[str, Any]] | None = None, sampler: str | None = None, steps: int | None = None,
                checkpoint_sha256: str | None = None, seconds: float | None = None,
                files: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """A manifest record with the standard fields (``extra`` fields are kept as given; inference adds ``channel``,
    ``memory``: the volume's peak memory, and ``preprocess``: the preprocessing it ran with)."""
    return {
        "case": str(case),
        "setting": str(setting),
        "sample": int(sample),
        "seed": int(seed),
        "informed": dict(informed) if informed is not None else None,
        "mask_edits": [dict(e) for e in mask_edits] if mask_edits is not None else [],
        "sampler": sampler,
        "steps": steps,
        "checkpoint_sha256": checkpoint_sha256,
        "seconds": None if seconds is None else float(seconds),
        "files": {str(k): str(v) for k, v in (files or {}).items()},
        **extra,
    }


class Manifest:
    """The records of one run in ``path`` (JSON ``{"version": 1, "records": [...]}``), loaded if it exists (unless
    ``load=False``: start empty and overwrite it on the next write)."""

    def __init__(self, path: str | os.PathLike, load: bool = True):
        self.path = Path(path)
        self._records: dict[tuple[str, str, int], dict[str, Any]] = {}  # key -> record, in insertion order
        if not (load and self.path.exists()):
            return
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"manifest {self.path} is not valid JSON: {err}") from err
        if not isinstance(payload, dict) or "records" not in payload:
            raise ValueError(f"manifest {self.path} must hold {{'version': ..., 'records': [...]}}, "
                             f"got {type(payload).__name__}")
        version = payload.get("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise ValueError(f"manifest {self.path} has version {version!r}; this gem3d reads version "
                             f"{MANIFEST_VERSION}")
        for record in payload["records"]:
            self._insert(record, replace=False)

    def _insert(self, record: Mapping[str, Any], replace: bool) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise TypeError(f"a manifest record must be a dict, got {type(record).__name__}")
        key = record_key(record)
        plain = json.loads(json.dumps(dict(record), default=json_default))  # numpy scalars -> Python, tuples -> lists
        plain["sample"] = key[2]
        if key in self._records and not replace:
            raise ValueError(f"manifest {self.path} already has a record for {key}; "
                             "pass replace=True to overwrite it")
        self._records[key] = plain
        return plain

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records in insertion order (a new list; do not edit the dicts in place)."""
        return list(self._records.values())

    def has(self, key: Mapping[str, Any] | Iterable[Any]) -> bool:
        """Whether a record with key ``(case, setting, sample)`` (or a record's key) is present."""
        return record_key(key) in self._records

    def add(self, record: Mapping[str, Any], replace: bool = False) -> dict[str, Any]:
        """Add ``record`` and rewrite the manifest atomically. Duplicate keys fail unless ``replace``."""
        plain = self._insert(record, replace=replace)
        self.save()
        return plain

    def extend(self, records: Iterable[Mapping[str, Any]], replace: bool = False) -> None:
        """Add several records and rewrite the manifest once. Duplicate keys fail unless ``replace``."""
        for record in records:
            self._insert(record, replace=replace)
        self.save()

    def save(self) -> Path:
        """Write all records atomically."""
        return atomic_write_json(self.path, {"version": MANIFEST_VERSION, "records": self.records})

    def __len__(self) -> int:
        return len(self._records)


def merge_manifests(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> Manifest:
    """Merge per-rank manifests into ``out`` (written atomically), records sorted by key. Identical records under one
    key collapse into one; two different ones are an error that names both files."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"manifest(s) to merge not found: {missing}")
    seen: dict[tuple[str, str, int], tuple[dict[str, Any], Path]] = {}
    for path in paths:
        for record in Manifest(path).records:
            key = record_key(record)
            first, first_path = seen.setdefault(key, (record, path))
            if first != record:
                raise ValueError(f"conflicting records for {key} in {first_path} and {path}")
    merged = Manifest(out, load=False)
    merged._records = {key: seen[key][0] for key in sorted(seen)}
    merged.save()
    return merged
