"""Config loading: defaults, YAML, overrides, strict errors naming the key, resolved config round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from fcmae.cli import pretrain_main
from fcmae.config import ConfigError, flatten_config, load_config, save_config
from fcmae.pretrain_config import PretrainConfig, load_pretrain_config

GEN = ["data.generated_images=8"]


def load(tmp_path, *overrides, text=None):
    path = None
    if text is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
    return load_pretrain_config(path, [f"output_dir={tmp_path / 'run'}", *overrides])


def test_defaults_are_the_paper_recipe(tmp_path):
    cfg = load(tmp_path, *GEN)
    assert (cfg.optim.blr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.min_lr) == (1.5e-4, 0.05, (0.9, 0.95), 0)
    assert (cfg.train.epochs, cfg.optim.warmup_epochs, cfg.train.batch_size) == (800, 40.0, 64)
    assert (cfg.data.crop_scale, cfg.data.input_size, cfg.model.mask_ratio) == ((0.2, 1.0), 224, 0.6)
    assert cfg.data.mean == (0.485, 0.456, 0.406) and cfg.optim.clip_grad is None


def test_yaml_then_overrides_with_types_resolved(tmp_path):
    text = "model:\n  name: convnextv2_tiny\noptim:\n  blr: 1e-4\ndata:\n  generated_images: 8\n"
    cfg = load(tmp_path, "optim.blr=2e-4", "train.batch_size=32", "data.mean=[0.5, 0.5, 0.5]",
               "optim.clip_grad=1", "log.trackers=[]", "model.pretrained=", text=text)
    assert cfg.model.name == "convnextv2_tiny"
    assert cfg.optim.blr == 2e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.train.batch_size == 32 and cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.log.trackers == [] and cfg.model.pretrained is None


@pytest.mark.parametrize("overrides, key, words", [
    (["optim.bl=1e-4"], "optim.bl", "did you mean 'optim.blr'"),
    (["nonsense.key=1"], "nonsense", "unknown key"),
    (["train.batch_size=abc"], "train.batch_size", "expected int, got str 'abc'"),
    (["train.batch_size=1.5"], "train.batch_size", "expected int"),
    (["train.compile=1"], "train.compile", "expected bool"),
    (["train.compile_mode=reduce-overhead"], "train.compile_mode", "needs train.compile=true"),
    (["train.compile=true", "train.compile_mode=fast"], "train.compile_mode", "must be one of"),
    (["model.name=7"], "model.name", "expected str"),
    (["train.mixed_precision=fp8"], "train.mixed_precision", "must be one of"),
    (["data.crop_scale=[0.2]"], "data.crop_scale", "expected 2 values"),
    (["data.input_size=100"], "data.input_size", "multiple of 32"),
    (["model.mask_ratio=1.0"], "model.mask_ratio", "[0, 1)"),
    (["model.mask_ratio=-0.1"], "model.mask_ratio", "[0, 1)"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
    (["model.name=convnextv2_giant"], "model.name", "unknown model"),
    (["data.mean=[0.5]"], "data.mean", "model.in_chans is 3"),
    (["data.generated_images=0", "data.path=/no/such/folder"], "data.path", "does not exist"),
    (["data.name=cifar10"], "data.path", "only one of"),
    (["train.batch_size"], "train.batch_size", "key=value"),
])
def test_bad_values_raise_one_line_naming_the_key(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, *GEN, *overrides)
    assert info.value.key == key
    assert words in str(info.value) and "\n" not in str(info.value)


def test_missing_data_source_is_reported_before_any_work(tmp_path, capsys):
    cfg = load(tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.path: missing: set data\.path"):
        cfg.data.require_source()
    with pytest.raises(SystemExit):
        pretrain_main([f"output_dir={tmp_path / 'run'}"])
    assert capsys.readouterr().err.startswith("config error: data.path: missing")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir: cannot create .* is not a directory"):
        load_pretrain_config(None, [*GEN, f"output_dir={blocker / 'run'}"])


def test_yaml_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key"):
        load(tmp_path, text="train:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(tmp_path, text="train: [unclosed\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_pretrain_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load(tmp_path, *GEN, text="train: 5\n")


def test_resolved_config_round_trips(tmp_path):
    cfg = load(tmp_path, *GEN, "optim.blr=3e-4", "log.trackers=[tensorboard]")
    save_config(cfg, tmp_path, "9.9")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# resolved configuration written by fcmae 9.9")
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == cfg
    assert '"fcmae_version": "9.9"' in (tmp_path / "run_info.json").read_text()
    flat = flatten_config(cfg)
    assert flat["optim.blr"] == 3e-4 and flat["data.mean"] == "[0.485, 0.456, 0.406]"


@dataclass
class _Head:
    kind: Literal["linear", "mlp"] = "linear"
    dims: list[int] = field(default_factory=lambda: [8])

    def validate(self):
        if any(d < 1 for d in self.dims):
            raise ConfigError("dims", "must be positive")


@dataclass
class _OtherSchema:
    lr_scales: dict[str, float] = field(default_factory=dict)
    head: _Head = field(default_factory=_Head)
    note: str | None = None


def test_loader_is_generic_over_dataclasses():
    cfg = load_config(_OtherSchema, None, ["lr_scales={a: 1, b: 0.5}", "head.kind=mlp", "head.dims=[4, 2]"])
    assert cfg == _OtherSchema({"a": 1.0, "b": 0.5}, _Head("mlp", [4, 2]))
    with pytest.raises(ConfigError, match=r"^head\.dims: must be positive$"):
        load_config(_OtherSchema, None, ["head.dims=[0]"])
    with pytest.raises(ConfigError, match=r"^lr_scales\.a: expected float"):
        load_config(_OtherSchema, None, ["lr_scales={a: x}"])


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys, monkeypatch):
    import fcmae.pretraining

    monkeypatch.setattr(fcmae.pretraining, "run_pretraining", lambda cfg: pytest.fail("training started"))
    with pytest.raises(SystemExit) as info:
        pretrain_main([f"output_dir={tmp_path}", *GEN, "model.mask_ratio=1.5"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: model.mask_ratio: must be in [0, 1), got 1.5"
