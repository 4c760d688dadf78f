"""Seeing progress: reconstruction previews, the kNN monitor and tracker output."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fcmae
from fcmae.knn import knn_top1
from fcmae.loss import normalize_patches, patchify
from fcmae.model import FCMAEOutput
from fcmae.pretraining import run_pretraining
from fcmae.preview import reconstruct, reconstruction_grid
from tests.pretrain_helpers import reset_accelerate, tiny_config, write_images


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


class _Oracle(torch.nn.Module):
    """Predicts the (normalised) target patches exactly: a perfect reconstruction must equal the input."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.patch_size, self.norm_pix_loss = model, model.patch_size, model.norm_pix_loss

    def forward(self, imgs, mask):
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            target = normalize_patches(target)[0]
        return FCMAEOutput(torch.zeros(()), target[mask.flatten(1)], mask.flatten(1))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruction_undoes_norm_pix_and_pastes_visible_patches(norm_pix_loss):
    model = fcmae.create_fcmae("convnextv2_test", decoder_embed_dim=8, norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 64, 96)
    mask = fcmae.random_mask(2, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    masked, recon = reconstruct(_Oracle(model), imgs, mask)
    torch.testing.assert_close(recon, imgs, atol=1e-5, rtol=1e-5)
    pixel_mask = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand_as(imgs)
    assert torch.all(masked[pixel_mask] == 0) and torch.equal(masked[~pixel_mask], imgs[~pixel_mask])
    _, real = reconstruct(model, imgs, mask)
    assert torch.equal(real[~pixel_mask], imgs[~pixel_mask]) and not torch.allclose(real, imgs)


def test_reconstruction_grid_layout():
    model = fcmae.create_fcmae("convnextv2_test", decoder_embed_dim=8)
    image = reconstruction_grid(model, torch.zeros(3, 3, 64, 64), torch.zeros(3, 2, 2, dtype=torch.bool),
                                (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert image.size == (3 * 64 + 2 * 2, 3 * 64 + 2 * 2) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (128, 128, 128) and image.getpixel((64, 0)) == (255, 255, 255)


def test_knn_top1_votes_with_weighted_neighbours():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    val = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]]), dim=1)
    assert knn_top1(train, labels, val, torch.tensor([0, 1, 1]), k=2, temperature=0.07) == 1.0
    assert knn_top1(train, labels, val, torch.tensor([1, 1, 0]), k=2, temperature=0.07) == pytest.approx(1 / 3)


def test_knn_monitor_and_tensorboard_in_a_run(tmp_path):
    write_images(tmp_path / "knn_train", 6, classes=2)
    write_images(tmp_path / "knn_val", 4, classes=2, start_seed=100)
    cfg = tiny_config(tmp_path / "run", "data.generated_images=8", "train.epochs=2", "knn.every_epochs=1",
                      f"knn.train_path={tmp_path / 'knn_train'}", f"knn.val_path={tmp_path / 'knn_val'}",
                      "knn.k=3", "log.trackers=[tensorboard]")
    run_dir = run_pretraining(cfg)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    knn = [e for e in log if e["event"] == "metrics" and "knn/top1" in e]
    assert [e["step"] for e in knn] == [2, 4] and all(0.0 <= e["knn/top1"] <= 1.0 for e in knn)
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events_file = next((run_dir / "tracking").rglob("events.out.tfevents.*"))
    board = event_accumulator.EventAccumulator(str(events_file.parent))
    board.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "knn/top1"} <= set(board.Tags()["scalars"])
    assert "reconstruction" in board.Tags()["images"]
