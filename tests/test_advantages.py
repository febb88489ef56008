import pytest
import torch

from grpo.algo.advantages import group_advantages, zero_std_fraction


def test_group_scale_matches_hand_computed_values():
    # mean 0.875, unbiased std sqrt(2.1875 / 3) = 0.853913; eps 1e-4 in the denominator
    a = group_advantages(torch.tensor([0.5, 1.0, 0.0, 2.0]), group_size=4)
    torch.testing.assert_close(a, torch.tensor([-0.439104, 0.146368, -1.024575, 1.317311]), atol=1e-6, rtol=0)


def test_groups_are_normalised_separately_and_equal_groups_give_zero():
    a = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), group_size=2)
    # group 1: mean 0.5, std sqrt(0.5) = 0.707107 -> +-0.5 / 0.707207; group 2: all equal -> 0
    torch.testing.assert_close(a, torch.tensor([0.707007, -0.707007, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_batch_and_none_scales():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    # batch std of [1, 0, 3, 3]: mean 1.75, var (0.5625 + 3.0625 + 1.5625 * 2) / 3 = 2.25, std 1.5
    torch.testing.assert_close(group_advantages(r, 2, scale="batch"),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]) / 1.5001, atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(r, 2, scale="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="median")


def test_zero_std_fraction():
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2) == pytest.approx(2 / 3)
