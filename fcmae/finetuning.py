"""A finetuning run: labeled data, classifier, layer-decay AdamW, accelerate, EMA, evaluation, checkpoints.

Run directory (``output_dir``)::

    config.yaml, run_info.json       resolved config (reloadable with --config), version and git commit
    log.jsonl                        start/resume/metrics/eval/epoch/end events, one JSON object per line
    checkpoints/checkpoint_<step>/   accelerate save_state (+ EMA, best scores) + manifest; resume picks the latest
    weights/last.safetensors         the classifier at the last evaluation (loads with models.create_model)
    weights/best.safetensors         the classifier with the best top-1 so far
    weights/{last,best}_ema.safetensors   the same for the EMA weights (ema.enabled)
    eval.json                        metrics of the last evaluation

Pieces shared with pretraining: the accelerator, run directory, checkpoint manager, train state, log,
optimizer groups and lr schedule (``fcmae.pretraining``, ``run_state``, ``tracking``, ``optim``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import datasets
import torch
from safetensors.torch import save_file
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3
from torch import nn

import fcmae
from fcmae.config import ConfigError, flatten_config, save_config
from fcmae.engine import StepStats, parameters_finite
from fcmae.finetune_config import FinetuneConfig, FinetuneModelConfig, FinetuneOptimConfig
from fcmae.finetune_data import LabeledSource, build_eval_loader, build_train_loader, load_labeled_source
from fcmae.finetune_engine import FinetuneEngine, build_criterion, build_mixup, evaluate
from fcmae.layer_decay import lr_scale
from fcmae.optim import LrSchedule, build_adamw, scaled_lr
from fcmae.pretraining import start_run
from fcmae.run_state import CheckpointManager, TrainState
from fcmae.tracking import RunLog
from models import ConvNeXtV2, create_model
from models.checkpoint import load_pretrained


@dataclass
class BestScores:
    """Best top-1 of the model and of its EMA so far (checkpointed with the run)."""

    top1: float = -1.0
    top1_ema: float = -1.0

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.top1, self.top1_ema = float(state["top1"]), float(state["top1_ema"])


def build_classifier(cfg: FinetuneModelConfig, num_classes: int, eval_only: bool = False) -> ConvNeXtV2:
    """The classifier of ``cfg`` with ``num_classes`` outputs, its weights from ``cfg.pretrained``.

    Finetuning takes everything but the classifier from the file and initialises the head small
    (official: weight ~ trunc_normal(std=head_init_std), bias 0); ``eval_only`` loads the whole
    classifier strictly. From scratch, the head is scaled by ``head_init_scale``.
    """
    model = create_model(cfg.name, num_classes=num_classes, drop_path_rate=cfg.drop_path_rate,
                         in_chans=cfg.in_chans, head_init_scale=cfg.head_init_scale)
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained, fresh=() if eval_only else ("classifier",))
        if not eval_only:
            trunc_normal_(model.head.fc.weight, std=cfg.head_init_std)
            nn.init.zeros_(model.head.fc.bias)
    return model


def freeze_encoder(model: ConvNeXtV2) -> tuple[nn.Module, ...]:
    """Linear probe: only the head (final norm + linear) trains; returns the frozen modules."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return model.stem, model.stages


def layer_decay_scale(cfg: FinetuneOptimConfig, depths: tuple[int, ...]):
    """``name -> lr multiplier`` for :func:`fcmae.optim.param_groups`, or None without layer decay."""
    if cfg.layer_decay == 1.0:
        return None
    return partial(lr_scale, depths=depths, mode=cfg.layer_decay_type, decay=cfg.layer_decay)


def _eval_source(cfg: FinetuneConfig, dataset: datasets.Dataset | None) -> LabeledSource | None:
    if dataset is not None:
        return load_labeled_source(cfg.data, cfg.data.eval_split or "validation", dataset=dataset)
    if cfg.data.eval_path is not None:
        return load_labeled_source(cfg.data, cfg.data.train_split, cfg.data.eval_path)
    if cfg.data.eval_split is None or (cfg.data.path is None and cfg.data.name is None):
        return None
    return load_labeled_source(cfg.data, cfg.data.eval_split, cfg.data.path)


class FinetuningRun:
    """One run; build everything in ``__init__``, train with :meth:`run` (or :meth:`evaluate_only`)."""

    def __init__(self, cfg: FinetuneConfig, train_dataset: datasets.Dataset | None = None,
                 eval_dataset: datasets.Dataset | None = None):
        self.cfg, tc = cfg, cfg.train
        if train_dataset is None and eval_dataset is None:
            cfg.data.require_source()
        self.run_dir, self.accelerator, self.issues = start_run(cfg)
        acc = self.accelerator
        with acc.main_process_first():
            self.eval_source = _eval_source(cfg, eval_dataset)
            self.train_source = None if tc.eval_only else load_labeled_source(
                cfg.data, cfg.data.train_split, cfg.data.path, train_dataset)
        labeled = self.train_source or self.eval_source
        self.num_classes = cfg.model.num_classes or labeled.num_classes
        if self.num_classes < labeled.num_classes:
            raise ConfigError("model.num_classes", f"is {self.num_classes}, but the labels go up to "
                                                   f"{labeled.num_classes - 1}")
        model = build_classifier(cfg.model, self.num_classes, eval_only=tc.eval_only)
        self.frozen = freeze_encoder(model) if cfg.model.linear_probe else ()
        self.eval_loader = None
        if self.eval_source is not None:
            self.eval_loader = acc.prepare(build_eval_loader(self.eval_source, cfg.data, in_chans=cfg.model.in_chans,
                                                             batch_size=tc.eval_batch_size or 2 * tc.batch_size))
        self.model = model
        if not tc.eval_only:
            self._build_training(model)

    def _build_training(self, model: ConvNeXtV2) -> None:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        self.loader = build_train_loader(
            self.train_source, cfg.data, cfg.augment, in_chans=cfg.model.in_chans, batch_size=tc.batch_size,
            accumulation=tc.gradient_accumulation_steps, rank=acc.process_index, world_size=acc.num_processes,
            seed=tc.seed, pin_memory=acc.device.type == "cuda")
        self.global_batch = tc.batch_size * tc.gradient_accumulation_steps * acc.num_processes
        self.steps_per_epoch = self.loader.batches_per_epoch // tc.gradient_accumulation_steps
        self.total_steps = tc.epochs * self.steps_per_epoch
        oc = cfg.optim
        self.lr = oc.lr or scaled_lr(oc.blr, self.global_batch)
        self.schedule = LrSchedule(self.lr, oc.min_lr, oc.warmup_epochs * self.steps_per_epoch, self.total_steps)
        optimizer = build_adamw(model, self.lr, oc.weight_decay, oc.betas, oc.eps,
                                lr_scale=layer_decay_scale(oc, model.depths))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.state = TrainState(global_batch=self.global_batch, steps_per_epoch=self.steps_per_epoch)
        self.best = BestScores()
        self.ema = None
        if cfg.ema.enabled:
            self.ema = ModelEmaV3(acc.unwrap_model(self.model), decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        acc.register_for_checkpointing(self.state, self.best, *([self.ema] if self.ema is not None else []))
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", acc, cfg.checkpoint.keep_last)
        self.evaluated_step: int | None = None

    # --- evaluation only ----------------------------------------------------------------------------

    def evaluate_only(self) -> dict[str, float]:
        """Evaluate ``model.pretrained`` on the evaluation data; write eval.json and log.jsonl."""
        acc = self.accelerator
        self.log = RunLog(acc, self.run_dir, 0, 0, progress_bar=False)
        metrics = evaluate(acc, acc.prepare(self.model), self.eval_loader, self.issues)
        self._report_eval({"model": metrics}, step=0)
        acc.end_training()
        return metrics

    # --- training -----------------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, float]]:
        """Resume if possible, train to ``epochs`` (or ``max_steps``) with evaluations; the last metrics."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        resumed = self.checkpoints.resume(state) if cfg.checkpoint.resume else None
        if acc.is_main_process:
            save_config(cfg, self.run_dir, fcmae.__version__)
        acc.init_trackers(cfg.log.project_name, config=flatten_config(cfg))
        self.log = RunLog(acc, self.run_dir, self.total_steps, state.step, cfg.log.progress_bar, desc="finetune")
        self._announce(resumed)
        self._window = {"time": time.perf_counter(), "steps": 0, "loss": 0.0, "finite": 0}
        engine = FinetuneEngine(acc, self.model, self.optimizer, self.schedule, state, build_criterion(cfg.augment),
                                build_mixup(cfg.augment, self.num_classes), self.ema, self.global_batch,
                                cfg.optim.clip_grad, cfg.train.stop_after_nonfinite, self.issues, self.frozen)
        metrics: dict[str, dict[str, float]] = {}
        try:
            while state.epoch < cfg.train.epochs and not self._reached_max_steps():
                stopped = engine.train_one_epoch(self.loader.epoch(state.epoch, state.batch_in_epoch), self._on_step)
                if stopped:
                    break
                metrics = self._end_of_epoch() or metrics
            metrics = self._finish(metrics)
        finally:
            self.log.close()
            acc.end_training()
        return metrics

    def _announce(self, resumed: Path | None) -> None:
        acc, tc, oc = self.accelerator, self.cfg.train, self.cfg.optim
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log.write(
            f"finetune {self.cfg.model.name} to {self.num_classes} classes ({trainable / 1e6:.2f}M trainable"
            f"{', linear probe' if self.frozen else ''}); effective batch {self.global_batch} = {tc.batch_size} x "
            f"{acc.num_processes} processes x {tc.gradient_accumulation_steps} accumulation; lr {self.lr:.4g}"
            f" (layer decay {oc.layer_decay} {oc.layer_decay_type}); {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps, precision {acc.mixed_precision}")
        self.log.event("start", effective_batch=self.global_batch, lr=self.lr, num_classes=self.num_classes,
                       steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                       processes=acc.num_processes, precision=acc.mixed_precision, fcmae_version=fcmae.__version__)
        if resumed is not None:
            self.log.resumed(resumed, self.state.step, self.state.epoch)

    def _reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.state.step >= self.cfg.train.max_steps

    def _on_step(self, stats: StepStats) -> bool:
        """After every optimizer step: log and periodic checkpoint; True stops the run."""
        self.log.advance()
        window = self._window
        window["steps"] += 1
        if not stats.skipped:
            window["loss"] += stats.loss
            window["finite"] += 1
        if self.state.step % self.cfg.log.every_steps == 0:
            self._log_metrics(stats)
        every = self.cfg.checkpoint.every_steps
        if every and self.state.step % every == 0 and self.state.batch_in_epoch < self.loader.batches_per_epoch:
            self._save()
        return self._reached_max_steps()

    def _log_metrics(self, stats: StepStats) -> None:
        w, now = self._window, time.perf_counter()
        self.log.metrics(self.state.step, {
            "train/loss": w["loss"] / max(w["finite"], 1), "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
            "train/images_per_s": w["steps"] * self.global_batch / max(now - w["time"], 1e-9),
            "train/epoch": self.state.step / self.steps_per_epoch, "train/skipped_steps": self.state.nonfinite_total,
            "data/skipped_images": self.issues.skipped,
        })
        self._window = {"time": now, "steps": 0, "loss": 0.0, "finite": 0}

    def _end_of_epoch(self) -> dict[str, dict[str, float]] | None:
        state, cfg = self.state, self.cfg
        state.epoch += 1
        state.batch_in_epoch = 0
        self.log.event("epoch", epoch=state.epoch, step=state.step, data_issues=self.issues.summary())
        metrics = None
        if self.eval_loader is not None and state.epoch % cfg.train.eval_every_epochs == 0:
            metrics = self._evaluate_and_keep()
        if state.epoch % cfg.checkpoint.every_epochs == 0:
            self._save()
        return metrics

    def _evaluate_and_keep(self) -> dict[str, dict[str, float]]:
        """Evaluate the model (and EMA); write last and best weights."""
        acc = self.accelerator
        results = {"model": evaluate(acc, self.model, self.eval_loader, self.issues)}
        self.evaluated_step = self.state.step
        self._write_weights("last", acc.get_state_dict(self.model))
        if results["model"]["top1"] > self.best.top1:
            self.best.top1 = results["model"]["top1"]
            self._write_weights("best", acc.get_state_dict(self.model))
        if self.ema is not None:
            results["ema"] = evaluate(acc, self.ema.module, self.eval_loader)
            self._write_weights("last_ema", self.ema.module.state_dict())
            if results["ema"]["top1"] > self.best.top1_ema:
                self.best.top1_ema = results["ema"]["top1"]
                self._write_weights("best_ema", self.ema.module.state_dict())
        self._report_eval(results, self.state.step)
        return results

    def _report_eval(self, results: dict[str, dict[str, float]], step: int) -> None:
        values = {f"eval/{who}_{k}": v for who, m in results.items() for k, v in m.items() if k != "count"}
        self.log.metrics(step, values)
        self.log.event("eval", step=step, **values)
        summary = "; ".join(f"{who}: top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%, loss {m['loss']:.4f} "
                            f"on {int(m['count'])} images" for who, m in results.items())
        self.log.write(f"eval at step {step}: {summary}")
        if self.accelerator.is_main_process:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": step, **results}, indent=2) + "\n")

    def _write_weights(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """weights/<name>.safetensors in our layout (main process; written under a temporary name first)."""
        if not self.accelerator.is_main_process:
            return
        out = self.run_dir / "weights"
        out.mkdir(exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        meta = {"model": self.cfg.model.name, "num_classes": str(self.num_classes), "step": str(self.state.step)}
        tmp = out / f".{name}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(out / f"{name}.safetensors")

    def _save(self) -> None:
        if not parameters_finite(self.accelerator, self.model):
            raise RuntimeError(f"non-finite weights at step {self.state.step}: refusing to write a checkpoint")
        path = self.checkpoints.save(self.state.step)
        self.log.event("checkpoint", step=self.state.step, path=str(path))

    def _finish(self, metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Final checkpoint and, unless this epoch was just evaluated, a final evaluation."""
        if self.checkpoints.last_saved_step != self.state.step:
            self._save()
        if self.eval_loader is not None and self.evaluated_step != self.state.step:
            metrics = self._evaluate_and_keep()
        self.log.event("end", step=self.state.step, epoch=self.state.epoch, best_top1=self.best.top1,
                       best_top1_ema=self.best.top1_ema, data_issues=self.issues.summary())
        self.log.write(f"done at step {self.state.step}: best top-1 {self.best.top1:.2f}%"
                       + (f" (EMA {self.best.top1_ema:.2f}%)" if self.ema is not None else "")
                       + f"; run directory {self.run_dir}")
        return metrics


def run_finetuning(cfg: FinetuneConfig, train_dataset: datasets.Dataset | None = None,
                   eval_dataset: datasets.Dataset | None = None) -> dict[str, dict[str, float]]:
    """Finetune (or, with ``train.eval_only``, evaluate) as ``cfg`` says.

    Args:
        cfg: a validated :class:`FinetuneConfig`.
        train_dataset, eval_dataset: optional in-memory ``datasets.Dataset`` with image and label columns,
            used instead of ``cfg.data``'s sources.

    Returns:
        ``{"model": {"top1", "top5", "loss", "count"}, "ema": {...}}`` of the last evaluation (empty
        without evaluation data).
    """
    run = FinetuningRun(cfg, train_dataset, eval_dataset)
    if cfg.train.eval_only:
        return {"model": run.evaluate_only()}
    return run.run()
