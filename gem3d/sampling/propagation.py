"""Bi-directional overlapping propagation of clip windows over a volume (gem3d's version of GEM-3D §4).

A volume of ``num_slices`` slices is generated in windows of ``window`` consecutive slices (16 in the paper; a
volume with fewer slices uses one window of ``num_slices``, so every window has ``min(window, num_slices)`` slices).

The rule (every slice is generated exactly once):

1. **First window** (``direction="first"``): the window that starts at the informed slice's index ``s``,
   ``[s, s + window)``, moved down to end at the volume's last slice when it would run past it. It has no known frame
   and generates every slice it covers, slice ``s`` included; its informed latent is the real informed slice's.
2. **Upward** (``"up"``): each next window starts ``overlap`` slices below the highest generated slice ``hi``
   (``overlap=1``: at ``hi`` itself), and the last one is aligned to the volume's end.
3. **Downward** (``"down"``): the mirror image: each window ends ``overlap`` slices above the lowest generated
   slice ``lo``, and the last one is aligned to slice 0. The first downward window therefore has the first window's
   lowest slice (``s`` itself unless the first window was moved) as its known frame: the two directions join
   with known-frame continuity, which is why the downward pass runs one round behind the upward one.
4. In every window, each slice that an earlier window generated is a **known frame** at its true position (the
   ``overlap`` slices, and in the end-aligned windows every other already generated slice they cover); only the
   other slices are written. The window's **informed latent** is the latent of the generated slice nearest to its
   new slices (``hi`` upward, ``lo`` downward), which is one of its known frames whenever ``overlap >= 1``.

Batching: round 0 samples the first window alone; round r >= 1 samples the r-th upward and the (r-1)-th downward
window together in one ``sample_windows`` call, where both exist. All windows have the same length, so the jobs of
one call can be stacked into one batch. :func:`run_lockstep` samples the rounds of several volumes together.

``mode="base"`` (the paper's baseline, a model without informed slice): windows tile the volume from slice 0,
``[0, w), [w, 2w), ...``, the last aligned to the end; they are independent (no known frames, no informed latent),
and a slice covered twice is written by the first window that covers it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .samplers import KnownFrames

__all__ = [
    "DIRECTIONS",
    "Window",
    "WindowJob",
    "SampleWindows",
    "plan_windows",
    "plan_base_windows",
    "window_rounds",
    "propagation",
    "propagate_volume",
    "run_lockstep",
    "known_frames_for_jobs",
    "informed_latents_for_jobs",
]

DIRECTIONS = ("first", "up", "down", "base")
MODES = ("informed", "base")


@dataclass(frozen=True)
class Window:
    """One window of consecutive slices.

    ``indices``: ascending slice indices. ``known``: per slice, True if an earlier window generated it (a known
    frame, never written). ``direction``: one of ``DIRECTIONS``. ``write``: per slice, True if this window writes it.
    ``informed_index``: the slice whose generated latent is the window's informed latent (None: the real informed
    slice for ``"first"``, no informed slice for ``"base"``).
    """

    indices: tuple[int, ...]
    known: tuple[bool, ...]
    direction: str
    write: tuple[bool, ...]
    informed_index: int | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not (len(self.indices) == len(self.known) == len(self.write)) or not self.indices:
            raise ValueError(
                f"indices, known and write must be non-empty and of equal length, got "
                f"{len(self.indices)}, {len(self.known)}, {len(self.write)}"
            )
        if any(k and w for k, w in zip(self.known, self.write)):
            raise ValueError(f"a known frame cannot be written: indices={self.indices}, known={self.known}, write={self.write}")

    @property
    def new_indices(self) -> list[int]:
        """The slices this window writes."""
        return [i for i, w in zip(self.indices, self.write) if w]

    @property
    def known_indices(self) -> list[int]:
        return [i for i, k in zip(self.indices, self.known) if k]


@dataclass
class WindowJob:
    """What ``sample_windows`` needs to sample one window.

    ``indices``: its slice indices (ascending, F of them). ``known_latents``: slice index -> clean latent ``(C,h,w)``
    of each known frame. ``informed_latent``: ``(C,h,w)`` or None (baseline). ``window``: the plan entry.
    ``case``: whatever the sampler needs to know about the job's volume (its mask latents, its generator).
    """

    indices: list[int]
    known_latents: dict[int, torch.Tensor]
    informed_latent: torch.Tensor | None
    window: Window | None = field(default=None, repr=False)
    case: Any = field(default=None, repr=False)

    @property
    def known_mask(self) -> list[bool]:
        """Per frame of the window, True where it is known."""
        return [i in self.known_latents for i in self.indices]


SampleWindows = Callable[[list[WindowJob]], Sequence[torch.Tensor]]
SampleRounds = Callable[[list[list[WindowJob]]], Sequence[Sequence[torch.Tensor]]]
Propagation = Generator[list[WindowJob], Sequence[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- planning


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_plan_args(num_slices: int, window: int, overlap: int) -> None:
    if not _is_int(num_slices) or num_slices < 1:
        raise ValueError(f"num_slices must be an int >= 1, got {num_slices!r}")
    if not _is_int(window) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not _is_int(overlap) or not 0 <= overlap < window:
        raise ValueError(f"overlap must be an int in [0, window - 1] = [0, {window - 1}], got {overlap!r}")


def _window(start: int, length: int, lo: int, hi: int, direction: str, informed_index: int | None) -> Window:
    """Window ``[start, start+length)`` given the generated range ``[lo, hi]`` (empty when lo > hi)."""
    indices = tuple(range(start, start + length))
    known = tuple(lo <= i <= hi for i in indices)
    return Window(indices, known, direction, tuple(not k for k in known), informed_index)


def plan_windows(num_slices: int, start: int, window: int = 16, overlap: int = 1) -> tuple[list[Window], list[Window]]:
    """Plan the informed propagation: ``(up, down)`` with ``up[0]`` the first window (see the module docstring).

    ``start``: the informed slice's index in ``[0, num_slices)``. ``overlap``: known frames carried from window to
    window, in ``[0, window - 1]``.
    """
    _validate_plan_args(num_slices, window, overlap)
    if not _is_int(start) or not 0 <= start < num_slices:
        raise ValueError(f"start must be an int in [0, num_slices - 1] = [0, {num_slices - 1}], got {start!r}")
    num_slices, start, window, overlap = int(num_slices), int(start), int(window), int(overlap)
    length = min(window, num_slices)
    first_start = min(start, num_slices - length)
    lo, hi = first_start, first_start + length - 1
    up = [_window(first_start, length, 1, 0, "first", None)]  # nothing generated yet: no known frame
    while hi < num_slices - 1:
        s = min(hi - overlap + 1, num_slices - length)
        up.append(_window(s, length, lo, hi, "up", hi))
        hi = s + length - 1
    down: list[Window] = []
    while lo > 0:
        e = max(lo + overlap - 1, length - 1)
        down.append(_window(e - length + 1, length, lo, hi, "down", lo))
        lo = e - length + 1
    return up, down


def plan_base_windows(num_slices: int, window: int = 16) -> list[Window]:
    """The baseline's independent windows: ``[0, w), [w, 2w), ...``, the last aligned to the volume's end."""
    _validate_plan_args(num_slices, window, 0)
    num_slices, window = int(num_slices), int(window)
    length = min(window, num_slices)
    windows, covered = [], 0  # slices [0, covered) are written
    while covered < num_slices:
        s = min(covered, num_slices - length)
        indices = tuple(range(s, s + length))
        write = tuple(i >= covered for i in indices)
        windows.append(Window(indices, (False,) * length, "base", write, None))
        covered = s + length
    return windows


def window_rounds(up: list[Window], down: list[Window]) -> list[list[Window]]:
    """Group the plan into batched rounds: ``[[up[0]], [up[1], down[0]], [up[2], down[1]], ...]``."""
    rounds = [[up[0]]]
    for r in range(1, max(len(up), len(down) + 1)):
        rounds.append(([up[r]] if r < len(up) else []) + ([down[r - 1]] if r - 1 < len(down) else []))
    return rounds


# ---------------------------------------------------------------------------------------------- sampling


def propagation(
    num_slices: int,
    start: int | None,
    informed_latent: torch.Tensor | None,
    window: int = 16,
    overlap: int = 1,
    *,
    mode: str = "informed",
    base_batch: int = 2,
    case: Any = None,
) -> Propagation:
    """The propagation of one volume, step by step: a generator that yields each round's ``list[WindowJob]``
    (``case`` attached to every job), is sent their outputs ``(F, C, h, w)`` and returns all slice latents
    ``(num_slices, C, h, w)``. :func:`run_lockstep` drives several of them at once.

    ``informed_latent (C,h,w)``: the real informed slice's latent (``mode="informed"``), None for ``mode="base"``
    (where ``start`` is unused and up to ``base_batch`` independent windows form a round). Validated eagerly.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "informed":
        if not isinstance(informed_latent, torch.Tensor) or informed_latent.ndim != 3:
            got = tuple(informed_latent.shape) if isinstance(informed_latent, torch.Tensor) else informed_latent
            raise ValueError(f"mode='informed' needs informed_latent as a tensor (C,h,w), got {got!r}")
        rounds = window_rounds(*plan_windows(num_slices, start, window, overlap))
    else:
        if informed_latent is not None:
            raise ValueError("mode='base' samples without an informed slice; pass informed_latent=None")
        if not _is_int(base_batch) or base_batch < 1:
            raise ValueError(f"base_batch must be an int >= 1, got {base_batch!r}")
        windows = plan_base_windows(num_slices, window)
        rounds = [windows[i : i + base_batch] for i in range(0, len(windows), base_batch)]
    return _propagate(rounds, num_slices, informed_latent, case)


def _propagate(rounds: list[list[Window]], num_slices: int, informed_latent, case) -> Propagation:
    slices: list[torch.Tensor | None] = [None] * num_slices
    for windows_in_round in rounds:
        jobs = [_job(w, slices, informed_latent, case) for w in windows_in_round]
        outputs = list((yield jobs))
        if len(outputs) != len(jobs):
            raise ValueError(f"sample_windows returned {len(outputs)} outputs for {len(jobs)} jobs")
        for job, out in zip(jobs, outputs):
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != len(job.indices):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                raise ValueError(f"sample_windows output for window {job.indices} must be (F={len(job.indices)},C,h,w), got {got}")
            for index in job.window.new_indices:
                if slices[index] is not None:
                    raise RuntimeError(f"slice {index} would be written twice (window {job.indices})")
                slices[index] = out[job.indices.index(index)]
    missing = [i for i, s in enumerate(slices) if s is None]
    if missing:
        raise RuntimeError(f"slices {missing} were never generated")
    return torch.stack(slices)  # type: ignore[arg-type]


def run_lockstep(sample_rounds: SampleRounds, steppers: Iterable[Generator], batch: int = 1) -> Iterator:
    """Drive up to ``batch`` generators like :func:`propagation` round by round, one ``sample_rounds`` call per
    round for all of them: ``sample_rounds(rounds: list[list[WindowJob]])`` returns each one's outputs. A finished
    one yields its return value and the next of ``steppers`` takes its place (volumes of any length mix)."""
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    steppers, active = iter(steppers), []
    while True:
        while len(active) < batch and (stepper := next(steppers, None)) is not None:
            try:
                active.append((stepper, next(stepper)))
            except StopIteration as done:  # nothing to sample (e.g. a slice model's sample)
                yield done.value
        if not active:
            return
        outputs = sample_rounds([jobs for _, jobs in active])
        running = []
        for (stepper, _), out in zip(active, outputs):
            try:
                running.append((stepper, stepper.send(out)))
            except StopIteration as done:
                yield done.value
        active = running


def propagate_volume(
    sample_windows: SampleWindows,
    num_slices: int,
    start: int | None,
    informed_latent: torch.Tensor | None,
    window: int = 16,
    overlap: int = 1,
    *,
    mode: str = "informed",
    base_batch: int = 2,
    progress: bool = False,
) -> torch.Tensor:
    """Generate every slice latent of one volume; returns ``(num_slices, C, h, w)``.

    ``sample_windows(jobs: list[WindowJob]) -> list[Tensor (F, C, h, w)]`` samples one round's windows (one output
    per job, ``F = len(job.indices)``; the output at known positions is ignored). Arguments as :func:`propagation`.
    """
    steps = propagation(num_slices, start, informed_latent, window, overlap, mode=mode, base_batch=base_batch)
    with tqdm(desc="windows", disable=not progress, leave=False) as bar:

        def sample_rounds(rounds):
            bar.update(len(rounds[0]))
            return [sample_windows(rounds[0])]

        return next(run_lockstep(sample_rounds, [steps]))


def _job(window: Window, slices: list[torch.Tensor | None], informed_latent: torch.Tensor | None, case) -> WindowJob:
    known_latents = {}
    for index in window.known_indices:
        if slices[index] is None:
            raise RuntimeError(f"known frame {index} of window {window.indices} has not been generated")
        known_latents[index] = slices[index]
    if window.direction == "first":
        informed = informed_latent
    elif window.direction == "base":
        informed = None
    else:
        informed = slices[window.informed_index]
        if informed is None:
            raise RuntimeError(f"informed slice {window.informed_index} of window {window.indices} is not generated")
    return WindowJob(list(window.indices), known_latents, informed, window, case)


# ---------------------------------------------------------------------------------------------- batching helpers


def known_frames_for_jobs(
    jobs: Sequence[WindowJob], latent_shape: tuple[int, int, int], noise_level: str = "timestep",
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> KnownFrames | None:
    """Stack the jobs' known frames into :class:`KnownFrames` (``(B,F)`` mask, ``(B,F,C,h,w)`` latents); None if
    no job has a known frame. All jobs must have the same length."""
    lengths = {len(j.indices) for j in jobs}
    if len(lengths) != 1:
        raise ValueError(f"jobs must all have the same number of slices to be stacked, got lengths {sorted(lengths)}")
    (num_frames,) = lengths
    mask = torch.tensor([j.known_mask for j in jobs], dtype=torch.bool, device=device)
    if not bool(mask.any()):
        return None
    latents = torch.zeros((len(jobs), num_frames, *latent_shape), dtype=dtype, device=device)
    for b, job in enumerate(jobs):
        for f, index in enumerate(job.indices):
            if index in job.known_latents:
                latents[b, f] = job.known_latents[index].to(device=latents.device, dtype=dtype)
    return KnownFrames(mask=mask, latents=latents, noise_level=noise_level)


def informed_latents_for_jobs(jobs: Sequence[WindowJob]) -> torch.Tensor | None:
    """``(B,C,h,w)`` informed latents of the jobs, or None when none has one (baseline); mixing raises."""
    has = [j.informed_latent is not None for j in jobs]
    if not any(has):
        return None
    if not all(has):
        raise ValueError(f"either every job or none has an informed latent, got {has}")
    return torch.stack([j.informed_latent for j in jobs])
