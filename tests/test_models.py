"""ConvNeXt V2 model: official sizes, shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from models import create_model

# Paper table (1000 classes, 224 px): parameters in millions, MACs in G.
PAPER = {
    "atto": (3.7, 0.55),
    "femto": (5.2, 0.78),
    "pico": (9.1, 1.37),
    "nano": (15.6, 2.45),
    "tiny": (28.6, 4.47),
    "base": (89.0, 15.4),
    "large": (198.0, 34.4),
    "huge": (660.0, 115.0),
}


def _on_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(f"convnextv2_{name}")


@pytest.mark.parametrize("size", list(PAPER))
def test_parameter_count_matches_paper(size):
    params = sum(p.numel() for p in _on_meta(size).parameters()) / 1e6
    expected = PAPER[size][0]
    digits = 1 if expected < 50 else 0
    assert round(params, digits) == expected


@pytest.mark.parametrize("size", list(PAPER))
def test_macs_at_224_match_paper(size):
    model = _on_meta(size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    macs = counter.get_total_flops() / 2e9
    assert macs == pytest.approx(PAPER[size][1], rel=0.01)


def test_all_sizes_registered():
    assert set(models.list_models()) == {f"convnextv2_{s}" for s in [*PAPER, "test"]}


def test_unknown_model_name_is_an_error():
    with pytest.raises(ValueError, match="unknown model 'convnextv2_small'.*convnextv2_atto"):
        create_model("convnextv2_small")


@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_feature_shapes(hw):
    model = create_model("convnextv2_test", num_classes=7)
    x = torch.randn(2, 3, *hw)
    maps = model.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, c, hw[0] // r, hw[1] // r) for c, r in zip(model.dims, (4, 8, 16, 32), strict=True)
    ]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert model.forward_features(x).shape == (2, model.dims[-1], hw[0] // 32, hw[1] // 32)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("hw", [(100, 64), (64, 0), (48, 64)])
def test_image_size_not_multiple_of_32_is_an_error(hw):
    model = create_model("convnextv2_test")
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, *hw))


def test_every_parameter_gets_a_gradient():
    model = create_model("convnextv2_test", num_classes=5, drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 64)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_parameter_names_follow_timm():
    keys = set(create_model("convnextv2_test").state_dict())
    for key in [
        "stem.0.weight", "stem.1.weight", "stages.1.downsample.0.weight", "stages.1.downsample.1.weight",
        "stages.0.blocks.0.conv_dw.weight", "stages.0.blocks.0.norm.weight", "stages.0.blocks.0.mlp.fc1.weight",
        "stages.0.blocks.0.mlp.grn.weight", "stages.0.blocks.0.mlp.grn.bias", "stages.0.blocks.0.mlp.fc2.weight",
        "head.norm.weight", "head.fc.weight",
    ]:
        assert key in keys, key
    assert not any(k.startswith("stages.0.downsample") for k in keys)


def test_initialisation():
    model = create_model("convnextv2_base", head_init_scale=0.001)
    stds = [m.weight.std().item() for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert all(0.015 < s < 0.025 for s in stds[:-1])  # trunc normal 0.02, never the official std 1.0 re-init
    assert model.head.fc.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    for name, p in model.named_parameters():
        if name.endswith(".bias") or ".grn." in name:
            assert not p.any(), f"{name} should start at zero"


def test_in_chans_and_no_head():
    model = create_model("convnextv2_test", in_chans=1, with_head=False)
    assert model.head is None
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, model.dims[-1])
