"""Bad configurations stop ``pretrain.py`` with one line naming the problem, before any data, model
or run directory is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

import fcmae.pretraining
from fcmae.cli import pretrain_main


@pytest.fixture
def untouchable(monkeypatch):
    """Fail the test if a config error let the run reach the data or the model."""

    def touched(*args, **kwargs):
        raise AssertionError("data or model touched despite a bad config")

    monkeypatch.setattr(fcmae.pretraining, "load_image_source", touched)
    monkeypatch.setattr(fcmae.pretraining.fcmae, "create_fcmae", touched)


def run_cli(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        pretrain_main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("override, expected", [
    ("model.mask_ration=0.75", "config error: model.mask_ration: unknown key (did you mean 'model.mask_ratio'?)"),
    ("shuffle=true", "config error: shuffle: unknown key; known keys: output_dir, model, data, optim, train, "
                     "checkpoint, log, knn"),
    ("train.batch_size=sixty-four", "config error: train.batch_size: expected int, got str 'sixty-four'"),
    ("optim.blr=[1]", "config error: optim.blr: expected float, got list [1]"),
    ("model.norm_pix_loss=yes please", "config error: model.norm_pix_loss: expected bool, got str 'yes please'"),
    ("data.input_size=100", "config error: data.input_size: must be a positive multiple of 32, got 100"),
    ("model.mask_ratio=1.0", "config error: model.mask_ratio: must be in [0, 1), got 1.0"),
    ("model.mask_ratio=-0.5", "config error: model.mask_ratio: must be in [0, 1), got -0.5"),
    ("train.batch_size=0", "config error: train.batch_size: must be >= 1, got 0"),
    ("data.generated_images=0", "config error: data.path: missing: set data.path (image folder or parquet/arrow "
                                "files), data.name (a datasets hub name) or data.generated_images"),
])
def test_bad_value_is_one_line_and_nothing_runs(tmp_path, capsys, untouchable, override, expected):
    out = tmp_path / "run"
    assert run_cli(capsys, f"output_dir={out}", "data.generated_images=8", override) == expected
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys, untouchable):
    err = run_cli(capsys, f"output_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'nowhere'}")
    assert err == f"config error: data.path: {tmp_path / 'nowhere'} does not exist"


def test_output_dir_under_a_file(tmp_path, capsys, untouchable):
    (tmp_path / "file").write_text("x")
    err = run_cli(capsys, f"output_dir={tmp_path / 'file' / 'run'}", "data.generated_images=8")
    assert err == f"config error: output_dir: cannot create {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is " \
                  f"not a directory"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_output_dir_the_os_refuses(capsys, untouchable):
    # /proc accepts no new directories, even for root (for whom permission bits do not apply).
    err = run_cli(capsys, "output_dir=/proc/fcmae-run", "data.generated_images=8")
    assert err.startswith("config error: output_dir: cannot write to /proc/fcmae-run: ")


def test_read_only_directory(tmp_path, capsys, untouchable):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        (locked / "probe").touch()
    except PermissionError:
        pass
    else:
        pytest.skip("running as root: permission bits do not apply (see the /proc case)")
    err = run_cli(capsys, f"output_dir={locked / 'run'}", "data.generated_images=8")
    assert err == f"config error: output_dir: {locked} is not writable"


def test_bad_yaml_file(tmp_path, capsys, untouchable):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: convnextv2_atto\n  name: convnextv2_tiny\n")
    err = run_cli(capsys, "--config", str(path), f"output_dir={tmp_path / 'run'}")
    assert err.startswith(f"config error: {path}: invalid YAML: ") and "duplicate key(s) ['name']" in err
