"""The finetuning loop and evaluation, written against ``accelerate``: no argparse, no files.

One optimizer step is :func:`fcmae.engine.optimizer_step` (lr from the step counter, clipping, the
non-finite skip-and-count rule), shared with pretraining. Around it: timm ``Mixup``/CutMix on the
batch, the loss, and the EMA update after every optimizer step that was taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from fcmae.engine import StepStats, optimizer_step
from fcmae.finetune_config import AugmentConfig
from fcmae.images import DataIssues
from fcmae.optim import LrSchedule
from fcmae.run_state import TrainState


def build_mixup(aug: AugmentConfig, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` with the official arguments, or None when mixup and cutmix are off."""
    if not aug.mixing:
        return None
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax,
                 prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                 label_smoothing=aug.smoothing, num_classes=num_classes)


def build_criterion(aug: AugmentConfig) -> nn.Module:
    """Official choice: soft-target CE with mixup (smoothing is in the targets), else smoothed CE, else CE."""
    if aug.mixing:
        return SoftTargetCrossEntropy()
    if aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    return nn.CrossEntropyLoss()


@dataclass
class FinetuneEngine:
    """Everything the training loop touches.

    Attributes:
        accelerator: prepared with ``gradient_accumulation_steps``.
        model: the prepared classifier.
        optimizer: the prepared optimizer (layer-decay groups carry ``lr_scale``).
        schedule: learning rate as a function of ``state.step``.
        state: checkpointed counters, updated in place.
        criterion: loss of (logits, targets).
        mixup: batch mixing, or None.
        ema: weight average updated after every optimizer step taken, or None.
        global_batch: images per optimizer step over all processes.
        clip_grad: max gradient norm, or None.
        stop_after_nonfinite: consecutive non-finite steps that stop the run.
        issues: where the data issues of each batch are counted.
        frozen: modules kept in eval mode while training (the encoder of a linear probe).
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    state: TrainState
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    global_batch: int
    clip_grad: float | None
    stop_after_nonfinite: int
    issues: DataIssues
    frozen: tuple[nn.Module, ...] = ()

    def train_one_epoch(self, batches: Iterable[dict[str, Any]], on_step: Callable[[StepStats], bool]) -> bool:
        """Run the micro-batches of one epoch; ``on_step`` after each optimizer step returns True to stop.

        Returns:
            True when ``on_step`` asked to stop before the epoch ended.
        """
        acc, state = self.accelerator, self.state
        self.model.train()
        for module in self.frozen:
            module.eval()
        loss_sum, micro = torch.zeros((), device=acc.device), 0
        for batch in batches:
            self.issues.record(batch["issues"])
            imgs = batch["pixel_values"].to(acc.device, non_blocking=True)
            targets = batch["label"].to(acc.device, non_blocking=True)
            if self.mixup is not None:
                imgs, targets = self.mixup(imgs, targets)
            with acc.accumulate(self.model):
                loss = self.criterion(self.model(imgs), targets)
                acc.backward(loss)
                loss_sum += loss.detach().float()
                micro += 1
                state.batch_in_epoch += 1
                if acc.sync_gradients:
                    stats = self._step(loss_sum / micro)
            if acc.sync_gradients:
                loss_sum, micro = torch.zeros((), device=acc.device), 0
                if on_step(stats):
                    return True
        return False

    def _step(self, local_loss: torch.Tensor) -> StepStats:
        stats = optimizer_step(self.accelerator, self.model, self.optimizer, self.schedule, self.state, local_loss,
                               global_batch=self.global_batch, clip_grad=self.clip_grad,
                               stop_after_nonfinite=self.stop_after_nonfinite)
        if self.ema is not None and not stats.skipped:
            self.ema.update(self.accelerator.unwrap_model(self.model), step=self.state.step)
        return stats


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: Iterable[dict[str, Any]],
             issues: DataIssues | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and cross-entropy over a prepared evaluation loader.

    Predictions and labels are gathered with ``gather_for_metrics`` (duplicates of an uneven last batch
    dropped); items whose image could not be decoded carry label -1 and are left out of every metric.

    Returns:
        ``{"top1", "top5", "loss", "count"}``; ``top5`` is top-min(5, classes).
    """
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for batch in loader:
        if issues is not None:
            issues.record(batch["issues"])
        with accelerator.autocast():
            logits = model(batch["pixel_values"])
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["label"]))
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.numel()
    if count == 0:
        raise RuntimeError("no decodable evaluation image")
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count, "count": count}
