"""gem3d.models.conditioning: timestep / position embeddings and the concat condition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gem3d.models.conditioning import concat_condition, position_embedding, timestep_embedding


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 1.0, 321.0, 999.0])
    dim = 10
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    np.testing.assert_allclose(emb[:, :half].numpy(), np.cos(args), atol=1e-4)
    np.testing.assert_allclose(emb[:, half:].numpy(), np.sin(args), atol=1e-4)
    assert torch.equal(emb[0, :half], torch.ones(half)) and torch.equal(emb[0, half:], torch.zeros(half))


def test_timestep_embedding_odd_dim_and_period():
    emb = timestep_embedding(torch.tensor([5.0]), 7)
    assert emb.shape == (1, 7) and emb[0, -1] == 0
    assert torch.allclose(timestep_embedding(7, 8), timestep_embedding(torch.tensor([7]), 8))
    assert not torch.allclose(timestep_embedding(7, 8, max_period=100), timestep_embedding(7, 8))
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.zeros(2), 0)
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 2), 4)


def test_position_embedding_matches_original_slice_context(original_fixtures):
    vectors = torch.load(original_fixtures / "slice" / "vectors.pt", weights_only=True)
    dim = vectors["cond"].shape[1]
    assert torch.allclose(position_embedding(vectors["pos"], dim), vectors["cond"], atol=1e-5)
    assert torch.allclose(position_embedding(vectors["pos"], dim), timestep_embedding(1000 * vectors["pos"], dim))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        position_embedding(torch.tensor([1.5]), dim)


def test_concat_condition_puts_mask_first():
    mask = torch.randn(2, 3, 4, 8, 8)
    informed = torch.randn(2, 3, 4, 8, 8)
    cond = concat_condition(mask, informed)
    assert cond.shape == (2, 3, 8, 8, 8)
    assert torch.equal(cond[:, :, :4], mask) and torch.equal(cond[:, :, 4:], informed)
    assert concat_condition(mask) is mask  # baseline: mask only


def test_concat_condition_clips_share_their_informed_slice():
    mask = torch.randn(2, 5, 4, 8, 8)
    informed = torch.randn(2, 4, 8, 8)
    cond = concat_condition(mask, informed)
    assert cond.shape == (2, 5, 8, 8, 8)
    assert torch.equal(cond[1, 3, 4:], informed[1]) and torch.equal(cond[:, :, :4], mask)
    with pytest.raises(ValueError, match="does not match"):
        concat_condition(mask, torch.randn(3, 4, 8, 8))
    with pytest.raises(ValueError, match="mask_latent"):
        concat_condition(torch.randn(6, 4, 8, 8))

