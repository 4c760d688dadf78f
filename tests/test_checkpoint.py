"""Loading checkpoints of every supported layout: same outputs, strict errors, no code from files."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

import fcmae
import models
from models.checkpoint import CheckpointError, UnsafeCheckpointError, load_pretrained, read_state_dict
from models.formats import LAYOUTS, detect_layout, from_canonical, to_canonical
from tests.helpers import perturb_parameters
from tests.official_layouts import official_dense, official_me_training, official_remap

SIZE = "convnextv2_test"


def _classifier(num_classes: int = 5) -> models.ConvNeXtV2:
    model = models.create_model(SIZE, num_classes=num_classes).eval()
    perturb_parameters(model)
    return model


def _fcmae() -> fcmae.FCMAE:
    model = fcmae.create_fcmae(SIZE, decoder_embed_dim=16).eval()
    perturb_parameters(model)
    return model


def _assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    got = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[prefix + key], value), key


@pytest.mark.parametrize("grn_shape", ["4d", "2d", "1d"])
def test_official_dense_classifier_gives_same_logits(tmp_path, grn_shape):
    source = _classifier()
    torch.save({"model": official_dense(source.state_dict(), grn_shape), "epoch": 3}, tmp_path / "x_ema.pt")
    loaded = models.create_model(SIZE, num_classes=5, pretrained=tmp_path / "x_ema.pt").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_released_fcmae_encoder_into_classifier_and_fcmae(tmp_path):
    source = _classifier()
    encoder_only = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save({"model": official_dense(encoder_only, "2d")}, tmp_path / "x_fcmae.pt")
    classifier = models.create_model(SIZE, num_classes=7, pretrained=tmp_path / "x_fcmae.pt")
    _assert_same_weights(classifier, encoder_only)
    assert torch.equal(classifier.head.norm.weight, torch.ones(32))  # fresh, identity norm

    fresh = fcmae.create_fcmae(SIZE, decoder_embed_dim=16)
    model = fcmae.create_fcmae(SIZE, decoder_embed_dim=16)
    report = load_pretrained(model, tmp_path / "x_fcmae.pt")
    assert (report.layout, report.loaded, report.fresh) == ("official", ("encoder",), ("decoder",))
    _assert_same_weights(model, encoder_only, prefix="encoder.")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.encoder.forward_features(x), source.forward_features(x), rtol=0, atol=0)
    assert not torch.equal(model.pred.weight, fresh.pred.weight)  # a freshly drawn decoder, not a copy


def test_official_me_training_checkpoint_loads_into_fcmae(tmp_path):
    source = _fcmae()
    args = argparse.Namespace(model="convnextv2_test", mask_ratio=0.6, input_size=64)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    state = official_me_training(source.state_dict())
    torch.save({"model": state, "optimizer": optimizer, "epoch": 7, "scaler": {}, "args": args},
               tmp_path / "checkpoint-7.pth")
    assert "encoder.stages.0.0.dwconv.kernel" in state and state["encoder.stages.0.0.grn.gamma"].shape == (1, 32)

    loaded = fcmae.create_fcmae(SIZE, decoder_embed_dim=16, pretrained=tmp_path / "checkpoint-7.pth").eval()
    _assert_same_weights(loaded, source.state_dict())
    imgs = torch.randn(2, 3, 64, 64)
    mask = fcmae.random_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(imgs, mask).pred, source(imgs, mask).pred, rtol=0, atol=0)

    classifier = models.create_model(SIZE, num_classes=3, pretrained=tmp_path / "checkpoint-7.pth")
    torch.testing.assert_close(classifier.forward_features(imgs), source.encoder.forward_features(imgs))


def test_me_layout_agrees_with_the_official_remap():
    source = _fcmae()
    me_state = official_me_training(source.state_dict())
    ours = to_canonical(me_state, "official_fcmae")
    dense = {k: v for k, v in to_canonical(official_remap(me_state), "official").items()}
    assert set(dense) == {k for k in ours if k.startswith(("stem.", "stages."))}
    for key, value in dense.items():
        assert torch.equal(ours[key], value), key
    # and our writer of that layout is the inverse of our reader
    back = from_canonical(ours, "official_fcmae")
    assert set(back) == set(me_state)
    assert all(torch.equal(back[k], me_state[k]) for k in me_state)


def test_our_own_files_and_accelerate_state_load(tmp_path):
    from accelerate import Accelerator

    source = _fcmae()
    save_file(source.state_dict(), tmp_path / "fcmae.safetensors")
    save_file(source.encoder.state_dict(), tmp_path / "encoder.safetensors")
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(_fcmae())
    accelerator.save_state(tmp_path / "state")
    for path, want in ((tmp_path / "fcmae.safetensors", source), (tmp_path / "state", prepared)):
        model = fcmae.create_fcmae(SIZE, decoder_embed_dim=16, pretrained=path)
        _assert_same_weights(model, accelerator.unwrap_model(want).state_dict())
    encoder = fcmae.create_fcmae(SIZE, decoder_embed_dim=16, pretrained=tmp_path / "encoder.safetensors")
    _assert_same_weights(encoder, source.encoder.state_dict(), prefix="encoder.")

    classifier = _classifier()
    save_file(classifier.state_dict(), tmp_path / "cls.safetensors")
    _assert_same_weights(models.create_model(SIZE, num_classes=5, pretrained=tmp_path / "cls.safetensors"),
                         classifier.state_dict())


def test_layout_detection_covers_every_readable_layout():
    classifier, model = _classifier(), _fcmae()
    canonical = to_canonical(classifier.state_dict(), "ours")
    for name, layout in LAYOUTS.items():
        if layout.signature is None or name == "official_fcmae" or name == "ours_fcmae":
            continue
        assert detect_layout(from_canonical(canonical, name)).name == name
    assert detect_layout(model.state_dict()).name == "ours_fcmae"
    assert detect_layout(official_me_training(model.state_dict())).name == "official_fcmae"


def test_wrong_size_names_both_sizes(tmp_path):
    save_file(models.create_model("convnextv2_atto", num_classes=0).state_dict(), tmp_path / "atto.safetensors")
    with pytest.raises(CheckpointError, match=r"file holds .*convnextv2_atto.*the model is .*convnextv2_test"):
        models.create_model(SIZE, pretrained=tmp_path / "atto.safetensors")


def test_misfits_name_the_keys(tmp_path):
    state = _classifier().state_dict()
    broken = dict(state, **{"stages.0.blocks.0.extra": torch.zeros(1)})
    save_file(broken, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): stages.0.blocks.0.extra"):
        models.create_model(SIZE, num_classes=5, pretrained=tmp_path / "extra.safetensors")
    save_file({k: v for k, v in state.items() if k != "stages.1.blocks.0.norm.bias"}, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(1\): stages.1.blocks.0.norm.bias"):
        models.create_model(SIZE, num_classes=5, pretrained=tmp_path / "missing.safetensors")
    bad_grn = dict(state, **{"stages.0.blocks.0.mlp.grn.weight": torch.zeros(2, 16)})
    save_file(bad_grn, tmp_path / "grn.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\): stages.0.blocks.0.mlp.grn.weight"):
        models.create_model(SIZE, num_classes=5, pretrained=tmp_path / "grn.safetensors")


def test_other_classifier_head_needs_fresh(tmp_path):
    source = _classifier(num_classes=5)
    save_file(source.state_dict(), tmp_path / "cls.safetensors")
    with pytest.raises(CheckpointError, match=r"classifier:\n  mis-shaped \(2\): head.fc.bias"):
        models.create_model(SIZE, num_classes=3, pretrained=tmp_path / "cls.safetensors")
    model = models.create_model(SIZE, num_classes=3)
    report = load_pretrained(model, tmp_path / "cls.safetensors", fresh=("classifier",))
    assert report.loaded == ("encoder", "norm") and report.left_out == ("classifier",)
    assert torch.equal(model.head.norm.weight, source.head.norm.weight)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": _classifier().state_dict(), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil.pt.*system"):
        models.create_model(SIZE, num_classes=5, pretrained=tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_and_empty_files_give_clear_errors(tmp_path, suffix):
    state = _classifier().state_dict()
    path = tmp_path / f"full{suffix}"
    torch.save({"model": state}, path) if suffix == ".pt" else save_file(state, path)
    data = path.read_bytes()
    for name, payload in (("half", data[: len(data) // 2]), ("empty", b"")):
        cut = tmp_path / f"{name}{suffix}"
        cut.write_bytes(payload)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_state_dict(cut)


def test_unknown_layout_and_non_state_dict(tmp_path):
    save_file({"backbone.conv1.weight": torch.zeros(1)}, tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError, match=r"layout \(first keys: backbone.conv1.weight"):
        models.create_model(SIZE, pretrained=tmp_path / "resnet.safetensors")
    torch.save({"model": {"epoch": 3}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="without a weights file"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")
