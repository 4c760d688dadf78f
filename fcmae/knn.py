"""kNN monitor: top-1 accuracy of weighted k-nearest-neighbour voting on pooled encoder features.

Features are the dense encoder's last map, average-pooled and L2-normalised; each validation image
votes with its ``k`` most cosine-similar training images, weighted by ``exp(similarity / T)``
(the InstDisc / DINO rule). Broken images are skipped and counted like in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fcmae.data import LabeledImages, collate_examples, image_folder_dataset
from fcmae.images import DataIssues
from fcmae.pretrain_config import DataConfig, KnnConfig
from fcmae.transforms import EvalTransform


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: DataLoader, device: torch.device,
                    issues: DataIssues) -> tuple[Tensor, Tensor]:
    """(N, C) L2-normalised pooled features and (N,) labels of every decodable image in ``loader``.

    ``loader`` yields float32 pixels already normalised (:class:`fcmae.transforms.EvalTransform`), unlike
    the uint8 training batches.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        issues.record(batch["issues"])
        if batch["pixel_values"].numel() == 0:
            continue
        x = encoder.forward_features(batch["pixel_values"].to(device))  # (B, C, h, w)
        feats.append(F.normalize(x.float().mean(dim=(2, 3)), dim=1))
        labels.append(batch["label"].to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor, k: int,
             temperature: float, chunk: int = 1024) -> float:
    """Top-1 accuracy (0-1) of temperature-weighted kNN voting.

    Args:
        train_feats: (N, C) L2-normalised.
        train_labels: (N,) int.
        val_feats: (M, C) L2-normalised.
        val_labels: (M,) int.
        k: neighbours (capped at N).
        temperature: similarity temperature.
    """
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    correct = 0
    for start in range(0, val_feats.shape[0], chunk):
        sims, idx = (val_feats[start:start + chunk] @ train_feats.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(dim=1) == val_labels[start:start + chunk]).sum())
    return correct / val_feats.shape[0]


class KnnMonitor:
    """Loads the labeled train/val folders once; :meth:`evaluate` returns top-1 kNN accuracy."""

    def __init__(self, cfg: KnnConfig, data: DataConfig, in_chans: int, issues: DataIssues):
        transform = EvalTransform(data.input_size, data.mean, data.std)
        train = image_folder_dataset(cfg.train_path, with_labels=True)
        val = image_folder_dataset(cfg.val_path, with_labels=True)
        train_names = train.dataset.features["label"].names
        val_names = val.dataset.features["label"].names
        if not set(val_names) <= set(train_names):
            raise ValueError(f"knn.val_path has classes missing from knn.train_path: "
                             f"{sorted(set(val_names) - set(train_names))[:5]}")
        remap = [train_names.index(name) for name in val_names]
        val.dataset = val.dataset.map(lambda row: {"label": remap[row["label"]]})
        self.cfg, self.issues = cfg, issues
        issues.record(train.problems + val.problems)
        self.loaders = [
            DataLoader(LabeledImages(src, "label", transform, in_chans, data.max_image_pixels),
                       batch_size=cfg.batch_size, num_workers=min(data.num_workers, 4), collate_fn=collate_examples)
            for src in (train, val)
        ]

    def evaluate(self, encoder: nn.Module, device: torch.device) -> float:
        """Top-1 accuracy of the current ``encoder`` (a dense-capable ConvNeXtV2)."""
        train_feats, train_labels = pooled_features(encoder, self.loaders[0], device, self.issues)
        val_feats, val_labels = pooled_features(encoder, self.loaders[1], device, self.issues)
        return knn_top1(train_feats, train_labels, val_feats, val_labels, self.cfg.k, self.cfg.temperature)
