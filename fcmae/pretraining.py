"""A pretraining run: config -> data, model, optimizer, accelerate, checkpoints, logs and monitors.

Run directory (``output_dir``)::

    config.yaml, run_info.json   resolved config (reloadable with --config), version and git commit
    log.jsonl                    start/resume/metrics/epoch/end events, one JSON object per line
    checkpoints/checkpoint_<step>/   accelerate save_state + manifest (the last ``keep_last``)
    weights/fcmae.safetensors    full FCMAE (encoder + decoder) to continue pretraining
    weights/encoder.safetensors  encoder only: keys of ``models.create_model(name, with_head=False)``
    previews/step_<step>.png     original | masked input | reconstruction
    tracking/                    TensorBoard (or other accelerate trackers)
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, gather_object, set_seed
from safetensors.torch import save_file
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import fcmae
from fcmae.config import ConfigError, flatten_config, save_config
from fcmae.data import load_image_source
from fcmae.engine import Engine, NonFiniteWeightsError, StepStats, parameters_finite
from fcmae.images import DataIssues
from fcmae.knn import KnnMonitor
from fcmae.loader import build_pretrain_loader, decode_device, preview_images
from fcmae.optim import LrSchedule, build_adamw, scaled_lr
from fcmae.pretrain_config import PretrainConfig
from fcmae.preview import reconstruction_grid, save_preview
from fcmae.run_state import CheckpointManager, CheckpointWriteError, TrainState
from fcmae.sm_partition import SmPartition
from fcmae.tracking import RunLog, default_trackers, memory_gib
from fcmae.transforms import keyed_generator

PREVIEW_STREAM = 2


def run_pretraining(cfg: PretrainConfig, dataset: datasets.Dataset | None = None) -> Path:
    """Pretrain as ``cfg`` says (resuming from ``cfg.output_dir`` if it holds a checkpoint).

    Args:
        cfg: a validated :class:`PretrainConfig`.
        dataset: optional in-memory ``datasets.Dataset`` with an image column, used instead of ``cfg.data``.

    Returns:
        The run directory.
    """
    return PretrainingRun(cfg, dataset).run()


def prepare_run_dir(path: str) -> Path:
    """Create the run directory and prove it is writable (ConfigError otherwise)."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError("output_dir", f"cannot write to {run_dir}: {e.strerror or e}") from None
    return run_dir


def build_accelerator(cfg: PretrainConfig, run_dir: Path) -> Accelerator:
    """Accelerator with the run's precision, accumulation, trackers and (optionally) torch.compile in
    ``train.compile_mode``."""
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Without CUDA, processes started by a launcher (WORLD_SIZE > 1) must join a gloo CPU group.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    multi_cpu = not torch.cuda.is_available() and world_size > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=default_trackers(cfg.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tracking")),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", mode=cfg.train.compile_mode) if cfg.train.compile else None,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"launched as {world_size} processes but accelerate set up {accelerator.num_processes}; "
                           f"the processes would overwrite each other's run directory")
    return accelerator


def prefers_channels_last(device: torch.device) -> bool:
    """Whether the model is stored channels-last on ``device`` (on CUDA: faster convolutions under bf16)."""
    return device.type == "cuda"


def start_run(cfg: PretrainConfig) -> tuple[Path, Accelerator, DataIssues]:
    """What every run (pretraining or finetuning) does first: run directory, accelerator, seeds, issue counter."""
    run_dir = prepare_run_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg, run_dir)
    set_seed(cfg.train.seed, device_specific=True)
    prefix = f"[process {accelerator.process_index}] " if accelerator.num_processes > 1 else ""
    return run_dir, accelerator, DataIssues(prefix=prefix)


class PretrainingRun:
    """One run; build everything in ``__init__``, train with :meth:`run`."""

    def __init__(self, cfg: PretrainConfig, dataset: datasets.Dataset | None = None):
        self.cfg, tc = cfg, cfg.train
        if dataset is None:
            cfg.data.require_source()
        self.run_dir, self.accelerator, self.issues = start_run(cfg)
        acc = self.accelerator
        with acc.main_process_first():
            self.source = load_image_source(cfg.data, dataset, acc.num_processes * max(cfg.data.num_workers, 1))
        self.issues.record(self.source.problems)
        decoding_on = decode_device(cfg.data, acc.device)
        self.loader = build_pretrain_loader(
            cfg.data, self.source, in_chans=cfg.model.in_chans, batch_size=tc.batch_size,
            accumulation=tc.gradient_accumulation_steps, rank=acc.process_index, world_size=acc.num_processes,
            seed=tc.seed, pin_memory=acc.device.type == "cuda", decode_device=decoding_on)
        # data.decoder_sms > 0 needs decode_device=cuda (checked by the config), so decoding_on is the GPU
        self.partition = SmPartition(decoding_on, cfg.data.decoder_sms) if cfg.data.decoder_sms else None
        self.global_batch = tc.batch_size * tc.gradient_accumulation_steps * acc.num_processes
        self.steps_per_epoch = self.loader.batches_per_epoch // tc.gradient_accumulation_steps
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.lr = cfg.optim.lr or scaled_lr(cfg.optim.blr, self.global_batch)
        self.schedule = LrSchedule(self.lr, cfg.optim.min_lr, cfg.optim.warmup_epochs * self.steps_per_epoch,
                                   self.total_steps)
        model = fcmae.create_fcmae(**vars(cfg.model))
        if prefers_channels_last(acc.device):  # the engine hands it channels-last input to match
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_adamw(model, self.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.state = TrainState(global_batch=self.global_batch, steps_per_epoch=self.steps_per_epoch)
        acc.register_for_checkpointing(self.state)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", acc, cfg.checkpoint.keep_last)
        self.knn = KnnMonitor(cfg.knn, cfg.data, cfg.model.in_chans, self.issues) if cfg.knn.every_epochs else None
        self.preview_batch, self._last_preview = None, -1

    def run(self) -> Path:
        """Resume if possible, train to ``epochs`` (or ``max_steps``), then write weights and a preview."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        resumed = self.checkpoints.resume(state) if cfg.checkpoint.resume else None
        if acc.is_main_process:
            save_config(cfg, self.run_dir, fcmae.__version__)
        acc.init_trackers(cfg.log.project_name, config=flatten_config(cfg))
        self.log = RunLog(acc, self.run_dir, self.total_steps, state.step, cfg.log.progress_bar)
        self._announce(resumed)
        self._window = {"time": time.perf_counter(), "steps": 0, "loss": 0.0, "finite": 0}
        engine = self.engine()
        try:
            with self.on_partition():
                while state.epoch < cfg.train.epochs and not self._reached_max_steps():
                    # closed when the epoch ends early: a device decoder's thread stops with it
                    with contextlib.closing(self.loader.epoch(state.epoch, state.batch_in_epoch)) as batches:
                        if engine.train_one_epoch(batches, self._on_step):
                            break
                    self._end_of_epoch()
            self._finish()
        finally:
            self.log.close()
            acc.end_training()
        return self.run_dir

    def on_partition(self) -> contextlib.AbstractContextManager:
        """Where the training's CUDA work runs: on part of the SMs with ``data.decoder_sms`` (see
        :mod:`fcmae.sm_partition`), else where it is (a context that does nothing)."""
        return self.partition.running() if self.partition is not None else contextlib.nullcontext()

    def engine(self) -> Engine:
        """The training loop over this run's model, optimizer, schedule, state and normalisation."""
        cfg = self.cfg
        return Engine(self.accelerator, self.model, self.optimizer, self.schedule, self.state, cfg.train.seed,
                      self.global_batch, cfg.optim.clip_grad, cfg.train.stop_after_nonfinite, self.issues,
                      tuple(cfg.data.mean), tuple(cfg.data.std), cuda_graphs=cfg.train.captures_cuda_graphs)

    def _announce(self, resumed: Path | None) -> None:
        acc, tc = self.accelerator, self.cfg.train
        lr_rule = "optim.lr" if self.cfg.optim.lr else f"blr {self.cfg.optim.blr:g} x {self.global_batch} / 256"
        message = (f"effective batch {self.global_batch} = {tc.batch_size} per process x {acc.num_processes} "
                   f"processes x {tc.gradient_accumulation_steps} accumulation steps; lr {self.lr:.4g} ({lr_rule}); "
                   f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, precision {acc.mixed_precision}")
        self.log.write(message)
        self.log.event("start", effective_batch=self.global_batch, lr=self.lr, steps_per_epoch=self.steps_per_epoch,
                       total_steps=self.total_steps, processes=acc.num_processes, precision=acc.mixed_precision,
                       fcmae_version=fcmae.__version__)
        if resumed is not None:
            self.log.resumed(resumed, self.state.step, self.state.epoch)

    def _reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.state.step >= self.cfg.train.max_steps

    def _on_step(self, stats: StepStats) -> bool:
        """After every optimizer step: log, preview, periodic checkpoint; True stops the run."""
        cfg, step = self.cfg, self.state.step
        self.log.advance()
        self._accumulate_window(stats)
        if step % cfg.log.every_steps == 0:
            self._log_metrics(stats)
        if cfg.log.preview_every_steps and step % cfg.log.preview_every_steps == 0:
            self._preview()
        epoch_done = self.state.batch_in_epoch == self.loader.batches_per_epoch
        if self._step_checkpoint_due() and not epoch_done:
            self._save()
        return self._reached_max_steps()

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.state.step % every == 0

    def _accumulate_window(self, stats: StepStats) -> None:
        self._window["steps"] += 1
        if not stats.skipped:
            self._window["loss"] += stats.loss
            self._window["finite"] += 1

    def _log_metrics(self, stats: StepStats) -> None:
        w, now = self._window, time.perf_counter()
        values = {
            "train/loss": w["loss"] / max(w["finite"], 1),
            "train/lr": stats.lr,
            "train/grad_norm": stats.grad_norm,
            "train/images_per_s": w["steps"] * self.global_batch / max(now - w["time"], 1e-9),
            "train/memory_gib": memory_gib(self.accelerator.device),
            "train/epoch": self.state.step / self.steps_per_epoch,
            "train/skipped_steps": self.state.nonfinite_total,
            "data/skipped_images": self.issues.skipped,
        }
        self.log.metrics(self.state.step, values)
        self._window = {"time": now, "steps": 0, "loss": 0.0, "finite": 0}

    def _end_of_epoch(self) -> None:
        state, cfg = self.state, self.cfg
        state.epoch += 1
        state.batch_in_epoch = 0
        self.log.event("epoch", epoch=state.epoch, step=state.step, data_issues=self.issues.summary())
        if state.epoch % cfg.checkpoint.every_epochs == 0 or self._step_checkpoint_due():
            self._save()
            self._export_weights()
        if self.knn is not None and state.epoch % cfg.knn.every_epochs == 0:
            self._knn()

    def _save(self) -> None:
        if not parameters_finite(self.accelerator, self.model):
            raise NonFiniteWeightsError(f"non-finite weights at step {self.state.step}: no checkpoint written; "
                                        f"the previous checkpoint is intact")
        path = self.checkpoints.save(self.state.step)
        self.log.event("checkpoint", step=self.state.step, path=str(path))

    def _export_weights(self) -> None:
        """Write weights/fcmae.safetensors and weights/encoder.safetensors (every process calls this)."""
        state_dict = self.accelerator.get_state_dict(self.model)
        consume_prefix_in_state_dict_if_present(state_dict, "_orig_mod.")  # train.compile's wrapper
        if not self.accelerator.is_main_process:
            return
        full = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        encoder = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
        meta = {"model": self.cfg.model.name, "step": str(self.state.step), "fcmae_version": fcmae.__version__}
        out = self.run_dir / "weights"
        for name, tensors in (("fcmae", full), ("encoder", encoder)):
            tmp = out / f".{name}.safetensors.tmp"
            try:
                out.mkdir(exist_ok=True)
                save_file(tensors, str(tmp), metadata=meta)
                tmp.replace(out / f"{name}.safetensors")
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise CheckpointWriteError(f"could not write {out / name}.safetensors: {e.strerror or e}; "
                                           f"the previous file (if any) is intact") from None

    def _preview(self) -> None:
        """Save and log the reconstruction of a fixed batch under a fixed mask (main process only)."""
        if not self.accelerator.is_main_process or self._last_preview == self.state.step:
            return
        self._last_preview = self.state.step
        model = self.accelerator.unwrap_model(self.model)
        if self.preview_batch is None:
            self.preview_batch = preview_images(self.cfg.data, self.source, self.cfg.log.preview_images,
                                                self.cfg.model.in_chans)
        imgs = self.preview_batch.to(self.accelerator.device)
        mask = model.random_mask(imgs, keyed_generator(self.cfg.train.seed, PREVIEW_STREAM))
        image = reconstruction_grid(model, imgs, mask, self.cfg.data.mean, self.cfg.data.std)
        path = save_preview(image, self.run_dir, self.state.step)
        self.log.image("reconstruction", image, self.state.step)
        self.log.event("preview", step=self.state.step, path=str(path))

    def _knn(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            encoder = acc.unwrap_model(self.model).encoder
            top1 = self.knn.evaluate(encoder, acc.device)
            self.log.metrics(self.state.step, {"knn/top1": top1})
            self.log.write(f"epoch {self.state.epoch}: kNN top-1 {100 * top1:.2f}%")
        acc.wait_for_everyone()

    def _finish(self) -> None:
        if self.checkpoints.last_saved_step != self.state.step:
            self._save()
        self._export_weights()
        self._preview()
        counts = gather_object([dict(self.issues.counts)])
        merged = DataIssues()
        for part in counts:
            merged.counts.update(part)
        agree = self._ranks_agree()
        self.log.event("end", step=self.state.step, epoch=self.state.epoch, processes=self.accelerator.num_processes,
                       ranks_agree=agree, skipped_steps=self.state.nonfinite_total, data_issues=merged.summary())
        self.log.write(f"done at step {self.state.step}: data {merged.summary()}; run directory {self.run_dir}")

    def _ranks_agree(self) -> bool:
        """Whether every process holds the same weights (a checksum per process, gathered)."""
        model = self.accelerator.unwrap_model(self.model)
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        sums = self.accelerator.gather(checksum.to(self.accelerator.device))
        return bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=0))
