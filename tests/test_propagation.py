"""Tests for gem3d.sampling.propagation (bi-directional overlapping window propagation)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gem3d.sampling.propagation import (
    informed_latents_for_jobs,
    known_frames_for_jobs,
    plan_base_windows,
    plan_windows,
    propagation,
    run_lockstep,
    window_rounds,
)
from gem3d.sampling.samplers import KnownFrames, make_schedule, sample
from gem3d.sampling.schedule import alphas_cumprod_tensor

LATENT = (1, 1, 1)  # (C, h, w): the fake sampler's latents are scalars


class RecordingSampler:
    """A fake ``sample_windows``: every frame of every job gets a unique value; known positions get NaN, so a
    known frame that were written would show up. Records each call's jobs and the slices generated before it."""

    def __init__(self):
        self.calls = []
        self.counter = 0
        self.values = {}  # (call, job, frame) -> value

    def __call__(self, jobs):
        outputs = []
        for j, job in enumerate(jobs):
            out = torch.empty(len(job.indices), *LATENT)
            for f, index in enumerate(job.indices):
                if index in job.known_latents:
                    out[f] = float("nan")
                else:
                    self.counter += 1
                    out[f] = float(self.counter)
                    self.values[(len(self.calls), j, f)] = float(self.counter)
            outputs.append(out)
        self.calls.append(jobs)
        return outputs


def propagate_volume(sample_windows, *args, **kwargs):
    """One volume through :func:`propagation`, each round sampled by ``sample_windows(jobs)``."""
    return next(run_lockstep(lambda rounds: [sample_windows(rounds[0])], [propagation(*args, **kwargs)]))


def run(num_slices, start, window, overlap):
    informed = torch.full(LATENT, -1.0)
    sampler = RecordingSampler()
    volume = propagate_volume(sampler, num_slices, start, informed, window=window, overlap=overlap)
    return volume, sampler, informed


def check_informed_run(num_slices, start, window, overlap):
    volume, sampler, informed = run(num_slices, start, window, overlap)
    length = min(window, num_slices)
    assert volume.shape == (num_slices, *LATENT)
    assert not torch.isnan(volume).any()  # no known frame was ever written
    written_by = {}
    generated: set[int] = set()
    for c, jobs in enumerate(sampler.calls):
        assert 1 <= len(jobs) <= 2
        if c == 0:
            assert len(jobs) == 1 and jobs[0].window.direction == "first"
            assert jobs[0].known_latents == {} and jobs[0].informed_latent is informed
            assert start in jobs[0].indices
            assert jobs[0].indices[0] == min(start, num_slices - length)
        else:
            assert [j.window.direction for j in jobs] in (["up", "down"], ["up"], ["down"])
        for j, job in enumerate(jobs):
            idx = job.indices
            assert len(idx) == length and idx == list(range(idx[0], idx[0] + length))
            assert 0 <= idx[0] and idx[-1] < num_slices
            # already generated slices the window covers are exactly its known frames, with their values
            assert set(job.known_latents) == generated & set(idx)
            for k, latent in job.known_latents.items():
                assert torch.equal(latent, volume[k])
            new = [i for i in idx if i not in job.known_latents]
            assert new, f"window {idx} generates nothing"
            if job.window.direction == "up":
                hi = max(generated)
                assert min(new) == hi + 1
                # starts `overlap` below the last generated slice, or is aligned to the volume's end
                assert idx[0] == hi - overlap + 1 or (idx[-1] == num_slices - 1 and idx[0] < hi - overlap + 1)
                assert torch.equal(job.informed_latent, volume[hi])
            elif job.window.direction == "down":
                lo = min(generated)
                assert max(new) == lo - 1
                assert idx[-1] == lo + overlap - 1 or (idx[0] == 0 and idx[-1] > lo + overlap - 1)
                assert torch.equal(job.informed_latent, volume[lo])
            if overlap >= 1 and c > 0:
                # the informed latent is one of the window's known frames
                assert any(job.informed_latent is v for v in job.known_latents.values())
            for f, index in enumerate(idx):
                if index not in job.known_latents:
                    assert index not in written_by, f"slice {index} generated twice"
                    written_by[index] = (c, j, f)
        # a round's windows only depend on earlier rounds
        for job in jobs:
            generated |= {i for i in job.indices if i not in job.known_latents}
    assert sorted(written_by) == list(range(num_slices))
    for index, key in written_by.items():
        assert volume[index].item() == sampler.values[key]
    return sampler


CASES = [
    (num_slices, window, overlap, start)
    for num_slices, window in itertools.product([1, 2, 3, 5, 15, 16, 17, 31, 40], [1, 2, 3, 5, 16])
    for overlap in range(window)
    for start in sorted({0, 1, num_slices // 2, num_slices - 2, num_slices - 1} & set(range(num_slices)))
]


def test_every_slice_generated_exactly_once_over_many_plans():
    assert len(CASES) > 500
    for num_slices, window, overlap, start in CASES:
        try:
            check_informed_run(num_slices, start, window, overlap)
        except AssertionError as error:
            raise AssertionError(f"num_slices={num_slices} window={window} overlap={overlap} start={start}") from error


def test_paper_setting_layout():
    """155 slices, window 16, overlap 1, informed slice 70."""
    up, down = plan_windows(155, 70, window=16, overlap=1)
    assert up[0].indices == tuple(range(70, 86)) and not any(up[0].known)
    assert up[1].indices[0] == 85 and up[1].known_indices == [85] and up[1].informed_index == 85
    assert up[-1].indices[-1] == 154  # aligned to the end, its extra covered slices known
    assert up[-1].known_indices == [i for i in up[-1].indices if i <= up[-2].indices[-1]]
    assert down[0].indices == tuple(range(55, 71)) and down[0].known_indices == [70] and down[0].informed_index == 70
    assert down[1].indices[-1] == 55 and down[1].known_indices == [55]
    assert down[-1].indices[0] == 0
    rounds = window_rounds(up, down)
    assert [len(r) for r in rounds][:2] == [1, 2]
    assert sum(len(r) for r in rounds) == len(up) + len(down)
    assert plan_windows(np.int64(155), np.int64(70)) == (up, down)  # numpy ints (e.g. from a random draw) work


def test_small_volume_shrinks_the_window():
    sampler = check_informed_run(7, 3, 16, 1)
    assert len(sampler.calls) == 1 and sampler.calls[0][0].indices == list(range(7))
    up, down = plan_windows(7, 6, window=16, overlap=1)
    assert len(up) == 1 and down == []


def test_start_at_the_top_moves_the_first_window_down():
    up, down = plan_windows(40, 39, window=16, overlap=1)
    assert up[0].indices == tuple(range(24, 40)) and len(up) == 1
    assert down[0].indices == tuple(range(9, 25)) and down[0].known_indices == [24]


def test_base_mode_independent_windows():
    sampler = RecordingSampler()
    volume = propagate_volume(sampler, 40, None, None, window=16, mode="base", base_batch=2)
    jobs = [job for call in sampler.calls for job in call]
    assert [len(call) for call in sampler.calls] == [2, 1]
    assert [job.indices[0] for job in jobs] == [0, 16, 24]
    assert all(job.known_latents == {} and job.informed_latent is None for job in jobs)
    assert list(itertools.compress(jobs[2].window.indices, jobs[2].window.write)) == list(range(32, 40))
    assert not torch.isnan(volume).any() and volume.shape == (40, *LATENT)
    assert len(set(volume.flatten().tolist())) == 40
    for num_slices, window in itertools.product([1, 2, 5, 16, 17, 33], [1, 3, 16]):
        windows = plan_base_windows(num_slices, window)
        written = [i for w in windows for i in itertools.compress(w.indices, w.write)]
        assert sorted(written) == list(range(num_slices))
        assert all(len(w.indices) == min(window, num_slices) and not any(w.known) for w in windows)


def test_validation_messages():
    informed = torch.zeros(LATENT)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, num_slices - 1\] = \[0, 9\], got 10"):
        plan_windows(10, 10)
    with pytest.raises(ValueError, match=r"overlap must be an int in \[0, window - 1\] = \[0, 3\], got 4"):
        plan_windows(10, 0, window=4, overlap=4)
    with pytest.raises(ValueError, match="num_slices must be an int >= 1"):
        plan_windows(0, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        propagate_volume(RecordingSampler(), 10, 0, informed, mode="bidirectional")
    with pytest.raises(ValueError, match="needs informed_latent"):
        propagate_volume(RecordingSampler(), 10, 0, None)
    with pytest.raises(ValueError, match="pass informed_latent=None"):
        propagate_volume(RecordingSampler(), 10, 0, informed, mode="base")
    with pytest.raises(ValueError, match="returned 0 outputs for 1 jobs"):
        propagate_volume(lambda jobs: [], 10, 0, informed)
    with pytest.raises(ValueError, match=r"must be \(F=4,C,h,w\)"):
        propagate_volume(lambda jobs: [torch.zeros(3, *LATENT) for _ in jobs], 10, 0, informed, window=4)


def test_propagation_with_ddim_keeps_known_frames_and_batches_jobs():
    """End to end with the real sampler: known frames go in as KnownFrames and come back unchanged."""
    ac = alphas_cumprod_tensor()
    latent = (2, 4, 4)
    gen = torch.Generator().manual_seed(0)
    seen_batches = []

    def eps_fn_for(informed):
        def eps_fn(x, t):
            return 0.5 * torch.tanh(x) + 0.1 * x.mean(1, keepdim=True) + 0.1 * informed[:, None]
        return eps_fn

    def sample_windows(jobs):
        known = known_frames_for_jobs(jobs, latent, noise_level="timestep")
        informed = informed_latents_for_jobs(jobs)
        x_T = torch.randn(len(jobs), len(jobs[0].indices), *latent, generator=gen)
        out = sample(eps_fn_for(informed), x_T, make_schedule("ddim", ac, 4, eta=1.0), known=known, generator=gen)
        seen_batches.append(len(jobs))
        if known is not None:
            assert isinstance(known, KnownFrames)
            assert torch.equal(out[known.mask], known.latents[known.mask])
        return list(out)

    volume = propagate_volume(sample_windows, 20, 9, torch.randn(latent), window=6, overlap=1)
    assert volume.shape == (20, *latent) and torch.isfinite(volume).all()
    assert seen_batches[0] == 1 and 2 in seen_batches


def test_run_lockstep_samples_the_rounds_of_several_volumes_together():
    """Volumes of different lengths share each round's call; a finished one leaves and the next takes its place."""
    plans = {0: (40, 20), 1: (10, 0), 2: (25, 24)}  # volume: (num_slices, start)
    seen = []

    def sample_rounds(rounds):  # frame value: 1000 x volume + slice index
        seen.append([jobs[0].case for jobs in rounds])
        frames = [[torch.tensor(job.indices, dtype=torch.float32).reshape(-1, 1, 1, 1) for job in jobs] for jobs in rounds]
        return [[1000.0 * job.case + f.expand(-1, *LATENT) for job, f in zip(jobs, fs)] for jobs, fs in zip(rounds, frames)]

    steppers = [propagation(n, s, torch.zeros(LATENT), window=6, case=c) for c, (n, s) in plans.items()]
    results = list(run_lockstep(sample_rounds, steppers, batch=2))
    assert [int(r[0]) // 1000 for r in results] == [1, 0, 2]  # in the order they finish
    for volume in results:
        c = int(volume[0]) // 1000
        assert torch.equal(volume.flatten(), 1000.0 * c + torch.arange(plans[c][0], dtype=torch.float32))
    rounds = {c: len(window_rounds(*plan_windows(n, s, window=6))) for c, (n, s) in plans.items()}
    assert seen[: rounds[1]] == [[0, 1]] * rounds[1] and seen[rounds[1]] == [0, 2]
    assert max(map(len, seen)) == 2 and len(seen) < sum(rounds.values())
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        next(run_lockstep(sample_rounds, steppers, batch=0))
