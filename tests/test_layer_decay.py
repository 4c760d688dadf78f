"""Layer-decay ids equal the official ConvNeXt V2 rules in both modes, on base and atto."""

from __future__ import annotations

import pytest
import torch

import models
from fcmae.layer_decay import layer_id, layer_scales, lr_scale, num_layers
from fcmae.optim import no_weight_decay_names
from models.formats import from_canonical


def _official_single(var_name: str, depths) -> int:
    """Transcription of the official ``get_num_layer_for_convnext_single`` (on official names)."""
    if var_name.startswith("downsample_layers"):
        return sum(depths[:int(var_name.split(".")[1])]) + 1
    if var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return sum(depths[:stage_id]) + block_id + 1
    return sum(depths) + 1


def _official_group(var_name: str) -> int:
    """Transcription of the official ``get_num_layer_for_convnext`` (group mode, 12 layers)."""
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split(".")[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage_id]
    if var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return {0: 1, 1: 2, 2: 3 + block_id // 3, 3: 12}[stage_id]
    return 13


@pytest.mark.parametrize("size", ["convnextv2_base", "convnextv2_atto"])
@pytest.mark.parametrize("mode", ["single", "group"])
def test_ids_equal_the_official_rules(size, mode):
    with torch.device("meta"):  # names and shapes only
        model = models.create_model(size, num_classes=10)
    ours = {name: p for name, p in model.state_dict().items()}
    # the official name of each of our parameters, through the official-layout key map
    official = dict(zip(ours, from_canonical(ours, "official"), strict=True))
    for name, official_name in official.items():
        want = _official_single(official_name, model.depths) if mode == "single" else _official_group(official_name)
        assert layer_id(name, model.depths, mode) == want, (name, official_name)


def test_known_values():
    base, atto = (3, 3, 27, 3), (2, 2, 6, 2)
    assert num_layers("single", atto) == 12 and num_layers("group", base) == 12
    assert layer_id("stem.0.weight", atto, "single") == 1
    assert layer_id("stages.2.downsample.1.weight", atto, "single") == 5  # first block of stage 2
    assert layer_id("stages.2.blocks.26.mlp.fc2.weight", base, "group") == 11
    assert layer_id("stages.3.downsample.0.bias", base, "group") == 12
    assert layer_id("head.fc.weight", base, "single") == 37
    assert lr_scale("head.fc.weight", atto, "single", 0.9) == 1.0
    assert lr_scale("stem.0.weight", atto, "single", 0.9) == pytest.approx(0.9 ** 12)
    assert layer_scales(0.6, 12)[0] == pytest.approx(0.6 ** 13)


def test_weight_decay_rule_is_the_official_finetune_rule():
    """fcmae.optim's no-decay set equals the official finetuning rule: 1-D tensors and biases (GRN included)."""
    model = models.create_model("convnextv2_test", num_classes=3)
    official = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    assert no_weight_decay_names(model) == official
    assert "stages.0.blocks.0.mlp.grn.weight" in official and "stem.1.weight" in official
