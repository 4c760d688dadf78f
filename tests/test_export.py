"""Export to the official, timm and transformers layouts: their models give our outputs, and files round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import fcmae
import models
from models.export import export_weights
from tests.helpers import perturb_parameters, relative_error

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
SIZE = "convnextv2_test"
TOL = dict(rtol=1e-5, atol=1e-5)


def _saved(model: torch.nn.Module, path: Path) -> Path:
    perturb_parameters(model)
    model.eval()
    save_file(model.state_dict(), path)
    return path


def _timm_model(depths, dims, conv_mlp: bool, num_classes: int) -> torch.nn.Module:
    """timm's ConvNeXt V2 built locally from its config (what timm's convnextv2_* entrypoints build)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=depths, dims=dims, use_grn=True, ls_init_value=None, conv_mlp=conv_mlp,
                    num_classes=num_classes).eval()


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_timm_gives_our_logits(tmp_path, conv_mlp):
    ours = models.create_model(SIZE, num_classes=4)
    export_weights(_saved(ours, tmp_path / "cls.safetensors"), "timm", tmp_path / "timm", conv_mlp=conv_mlp)
    assert not (tmp_path / "timm" / "config.json").exists()  # timm has no "test" size
    theirs = _timm_model(ours.depths, ours.dims, conv_mlp, 4)
    theirs.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(theirs(x), ours(x), **TOL)


def test_timm_atto_from_fcmae_checkpoint_loads_by_name(tmp_path):
    ours = fcmae.create_fcmae("convnextv2_atto", decoder_embed_dim=16)
    export_weights(_saved(ours, tmp_path / "fcmae.safetensors"), "timm", tmp_path / "timm")
    by_dir = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    by_file = timm.create_model("convnextv2_atto", num_classes=0,
                                checkpoint_path=str(tmp_path / "timm" / "model.safetensors")).eval()
    assert by_dir.stages[0].blocks[0].mlp.fc1.weight.ndim == 4  # timm's 1x1-conv MLP for atto
    x = torch.randn(2, 3, 64, 64)
    feats = ours.encoder.forward_features(x)
    pooled = F.layer_norm(feats.mean(dim=(2, 3)), (320,), eps=1e-6)  # identity final norm
    for theirs in (by_dir, by_file):  # 12 blocks of fp32 rounding: compare norm-wise
        assert relative_error(theirs.forward_features(x), feats) < 1e-5
        assert relative_error(theirs(x), pooled) < 1e-5
    x64 = x.double()
    assert relative_error(by_dir.double().forward_features(x64), ours.encoder.double().forward_features(x64)) < 1e-12


def test_transformers_gives_our_outputs(tmp_path):
    ours = models.create_model(SIZE, num_classes=4)
    export_weights(_saved(ours, tmp_path / "cls.safetensors"), "hf", tmp_path / "hf")
    config = transformers.ConvNextV2Config.from_pretrained(tmp_path / "hf")
    assert config.layer_norm_eps == 1e-6
    x = torch.randn(2, 3, 64, 96)
    classifier = transformers.ConvNextV2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(classifier(pixel_values=x).logits, ours(x), **TOL)
    backbone = transformers.ConvNextV2Model.from_pretrained(tmp_path / "hf").eval()
    out = backbone(pixel_values=x)
    torch.testing.assert_close(out.last_hidden_state, ours.forward_features(x), **TOL)
    torch.testing.assert_close(out.pooler_output, ours.forward_head(ours.forward_features(x), pre_logits=True), **TOL)


def test_transformers_encoder_export_has_identity_norm(tmp_path):
    ours = fcmae.create_fcmae(SIZE, decoder_embed_dim=16)
    export_weights(_saved(ours, tmp_path / "fcmae.safetensors"), "hf", tmp_path / "hf")
    backbone = transformers.ConvNextV2Model.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(backbone.layernorm.weight, torch.ones(32))
    x = torch.randn(2, 3, 64, 64)
    feats = ours.encoder.forward_features(x)
    torch.testing.assert_close(backbone(pixel_values=x).last_hidden_state, feats, **TOL)
    torch.testing.assert_close(backbone(pixel_values=x).pooler_output,
                               F.layer_norm(feats.mean(dim=(2, 3)), (32,), eps=1e-6), **TOL)


def test_official_export_is_what_timm_reads_as_official(tmp_path):
    from timm.models.convnext import checkpoint_filter_fn

    ours = models.create_model(SIZE, num_classes=4)
    export_weights(_saved(ours, tmp_path / "cls.safetensors"), "official", tmp_path / "x_ema.pt")
    official = torch.load(tmp_path / "x_ema.pt", weights_only=True)
    assert official["model"]["stages.0.0.grn.gamma"].shape == (1, 1, 1, 32)
    theirs = _timm_model(ours.depths, ours.dims, conv_mlp=False, num_classes=4)
    theirs.load_state_dict(checkpoint_filter_fn(official, theirs), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(theirs(x), ours(x), **TOL)


@pytest.mark.parametrize("fmt", ["official", "timm", "hf"])
@pytest.mark.parametrize("source", ["classifier", "fcmae"])
def test_every_format_round_trips(tmp_path, fmt, source):
    model = models.create_model(SIZE, num_classes=4) if source == "classifier" else fcmae.create_fcmae(
        SIZE, decoder_embed_dim=16)
    path = _saved(model, tmp_path / "src.safetensors")
    exported = export_weights(path, fmt, tmp_path / ("out.pt" if fmt == "official" else "out"))
    encoder = model if source == "classifier" else model.encoder
    if source == "classifier":
        back = models.create_model(SIZE, num_classes=4, pretrained=exported)
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    back = fcmae.create_fcmae(SIZE, decoder_embed_dim=16, pretrained=exported)
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, back.encoder.state_dict()[k]) for k, v in expected.items())
    # a second export of the export is the same file
    again = export_weights(exported, fmt, tmp_path / ("again.pt" if fmt == "official" else "again"))
    first, second = (_read(p) for p in (exported, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        return load_file(path / "model.safetensors")
    return torch.load(path, weights_only=True)["model"]


def test_export_script(tmp_path):
    path = _saved(models.create_model(SIZE, num_classes=0), tmp_path / "enc.safetensors")
    script = Path(__file__).resolve().parents[1] / "scripts" / "export.py"
    subprocess.run([sys.executable, str(script), "--checkpoint", str(path), "--format", "hf",
                    "--output", str(tmp_path / "hf")], check=True, capture_output=True)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors"}
