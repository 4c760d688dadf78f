"""Random masks: exact counts, reproducibility, validation."""

from __future__ import annotations

import pytest
import torch

from fcmae import as_grid_mask, num_visible, random_mask


def test_official_visible_count():
    assert num_visible(49, 0.6) == 19
    assert num_visible(49, 0.0) == 49


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.9])
def test_exact_count_per_sample(ratio):
    mask = random_mask(16, (7, 5), ratio)
    assert mask.dtype == torch.bool and mask.shape == (16, 7, 5)
    assert ((~mask).flatten(1).sum(1) == num_visible(35, ratio)).all()


def test_reproducible_with_generator_and_varies_per_sample():
    a = random_mask(8, (7, 7), 0.6, generator=torch.Generator().manual_seed(5))
    b = random_mask(8, (7, 7), 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) == 8


def test_uniform_over_patches():
    freq = random_mask(4000, (2, 2), 0.5).float().mean(0)
    assert torch.allclose(freq, torch.full((2, 2), 0.5), atol=0.03)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_an_error(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_mask(2, (7, 7), ratio)


def test_ratio_leaving_nothing_visible_is_an_error():
    with pytest.raises(ValueError, match="no visible patch"):
        random_mask(2, (2, 2), 0.8)


def test_user_masks_are_validated():
    flat = torch.tensor([[1, 0, 0, 1]])
    assert torch.equal(as_grid_mask(flat, 1, (2, 2)), torch.tensor([[[True, False], [False, True]]]))
    with pytest.raises(ValueError, match="shape"):
        as_grid_mask(flat, 1, (3, 3))
    with pytest.raises(ValueError, match="only 0"):
        as_grid_mask(torch.tensor([[2, 0, 0, 1]]), 1, (2, 2))
