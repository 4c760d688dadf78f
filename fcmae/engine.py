"""The FCMAE training loop, written against ``accelerate``: no argparse, no files.

Randomness is keyed by position: the mask of micro-batch ``b`` of epoch ``e`` on process ``r``
comes from ``keyed_generator(seed, MASK_STREAM, r, e, b)``, so a resumed run draws exactly the
masks an uninterrupted run would have drawn.

Non-finite handling: at every optimizer step the loss (averaged over processes) and the global
gradient norm are checked. If either is not finite, the update is skipped on every process
(gradients dropped; under fp16 the scaler still backs off) and counted in ``TrainState``; after
``stop_after_nonfinite`` such steps in a row, :class:`NonFiniteLossError` stops the run, so no
checkpoint with damaged weights is ever written. Under fp16, a finite loss with overflowing
gradients is the scaler's normal business: the scaler skips that update itself and it is not
counted.

Where the optimizer can skip an update on the device (fused AdamW takes a ``found_inf`` flag, as
``torch.amp.GradScaler`` passes it), the check runs there: the update is queued with its flag, and the
host reads the loss and norm afterwards. The host's share of the step (the optimizer's Python) then
overlaps the backward pass instead of following it while the GPU idles.

The pretraining loop settles step ``n`` one micro-batch late: after queuing the first micro-batch of step
``n + 1`` it waits for the figures, counts the step and runs ``on_step``. Where the check runs on the
device, the GPU thus has work while the host waits, and does not idle while the host prepares the next
step; where it runs on the host, the wait came before the update and only the counting moves. The state
``on_step`` sees is that of step ``n`` (its micro-batches counted, not the one queued after it), random
number generators included: ``on_step`` runs with them as they were before that micro-batch drew its
stochastic depth, so a checkpoint it writes resumes exactly. When ``on_step`` stops the loop, the queued
micro-batch's gradients are dropped and the generators stay rewound; a resumed run reads that batch
again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from fcmae.grad_norm import clip_gradients
from fcmae.images import DataIssues
from fcmae.optim import LrSchedule, apply_lr
from fcmae.run_state import TrainState
from fcmae.transforms import keyed_generator, normalize_pixels

MASK_STREAM = 1


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class NonFiniteWeightsError(RuntimeError):
    """The weights are not finite: nothing is saved from them."""


@dataclasses.dataclass
class StepStats:
    """What one optimizer step did: mean loss over micro-batches and processes, lr, gradient norm."""

    loss: float
    lr: float
    grad_norm: float
    skipped: bool


@dataclasses.dataclass
class Engine:
    """Everything the loop touches.

    Attributes:
        accelerator: prepared with ``gradient_accumulation_steps``.
        model: the prepared FCMAE; called as ``model(imgs, generator=...)`` (it draws the mask).
        optimizer: the prepared optimizer.
        schedule: learning rate as a function of ``state.step``.
        state: checkpointed counters, updated in place.
        seed: run seed (mask stream key).
        global_batch: images per optimizer step over all processes.
        clip_grad: max gradient norm, or None.
        stop_after_nonfinite: consecutive non-finite steps that stop the run.
        issues: where the data issues reported by each batch are counted.
        mean, std: per-channel normalisation of the uint8 ``pixel_values``, applied on the device.
        cuda_graphs: the compiled model captures CUDA graphs; each optimizer step starts a new graph
            iteration (its micro-batches share one, so the gradients they accumulate stay valid).
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    state: TrainState
    seed: int
    global_batch: int
    clip_grad: float | None
    stop_after_nonfinite: int
    issues: DataIssues
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cuda_graphs: bool = False

    def train_one_epoch(self, batches: Iterable[dict[str, Any]], on_step: Callable[[StepStats], bool]) -> bool:
        """Run the micro-batches of one epoch; ``on_step`` after each optimizer step returns True to stop.

        Args:
            batches: ``{"pixel_values": (B, C, S, S) uint8, "issues": [...]}`` (a :class:`fcmae.loader.PretrainLoader`
                epoch); pixels are normalised on the device, channels-last when the model is. Other keys ride
                along: the loop lets go of each batch once its GPU work is queued.
            on_step: called with each optimizer step's :class:`StepStats`, once the next step's first micro-batch
                is queued (or the epoch has ended).

        Returns:
            True when ``on_step`` asked to stop before the epoch ended.
        """
        acc = self.accelerator
        self.model.train()
        mean, std = (torch.tensor(v, device=acc.device) for v in (self.mean, self.std))
        memory_format = input_memory_format(self.model)
        accumulation = acc.gradient_accumulation_steps
        # accelerate's optimizer wrapper steps and zeroes only while this process-wide flag is set; only its
        # accumulate() changes it, which this loop does not use (below), but an earlier loop may have.
        acc.gradient_state._set_sync_gradients(True)
        loss_sum, micro, issues = torch.zeros((), device=acc.device), 0, []
        queued: QueuedStep | None = None  # the last optimizer step: update queued, figures not yet on the host
        for batch in batches:
            if queued is not None:  # this micro-batch runs before the queued step is settled
                generators_at_step = GeneratorStates.of(acc.device)
            issues += batch["issues"]
            pixels = batch["pixel_values"].to(acc.device, non_blocking=True)
            imgs = normalize_pixels(pixels, mean, std, memory_format)
            # FCMAE draws the mask from this generator itself, so it can promise the backend a fixed
            # visible count per sample (no host sync to count them).
            generator = self.mask_generator(micro + (queued.micro_batches if queued else 0))
            if self.cuda_graphs and micro == 0:  # the last step's graph outputs are read; their memory may go
                torch.compiler.cudagraph_mark_step_begin()
            syncs = micro + 1 == accumulation
            # Not accelerate's accumulate(): it counts micro-batches itself, this one read ahead included, and
            # saves that count with a checkpoint.
            with contextlib.nullcontext() if syncs else acc.no_sync(self.model):
                loss = self.model(imgs, generator=generator).loss
                acc.backward(loss)
            # Freed while the GPU runs this micro-batch, not when the next one starts and the GPU waits on the
            # host: a batch may hold a loader worker's shared memory (see fcmae.device_decode).
            batch = pixels = imgs = None
            loss_sum += loss.detach().float()
            micro += 1
            if queued is not None:
                if self.settle(queued, on_step, generators_at_step):
                    self.optimizer.zero_grad(set_to_none=True)  # the micro-batch queued since is dropped
                    return True
                queued = None
            if syncs:
                queued = self.queue_step(loss_sum / micro, micro, issues)
                loss_sum, micro, issues = torch.zeros((), device=acc.device), 0, []
        return queued is not None and self.settle(queued, on_step)

    def mask_generator(self, unsettled: int) -> torch.Generator:
        """Generator of the next micro-batch's masks, keyed by (process, epoch, micro-batch), that micro-batch
        coming ``unsettled`` after those ``state`` counts."""
        acc, state = self.accelerator, self.state
        return keyed_generator(self.seed, MASK_STREAM, acc.process_index, state.epoch,
                               state.batch_in_epoch + unsettled)

    def queue_step(self, local_loss: Tensor, micro_batches: int, issues: list[Any]) -> QueuedStep:
        """Queue the optimizer step over the last ``micro_batches`` micro-batches (their mean loss
        ``local_loss`` and data ``issues``)."""
        queued = queue_optimizer_step(self.accelerator, self.model, self.optimizer, self.schedule, self.state,
                                      local_loss, clip_grad=self.clip_grad)
        return dataclasses.replace(queued, micro_batches=micro_batches, issues=issues)

    def settle(self, queued: QueuedStep, on_step: Callable[[StepStats], bool],
               generators_at_step: GeneratorStates | None = None) -> bool:
        """Wait for a queued step's figures, count it and its micro-batches, and return ``on_step``'s answer.

        Args:
            generators_at_step: the random generators as the step left them, for ``on_step`` to run with (a
                micro-batch queued since has drawn from them); they stay so when it stops the loop.
        """
        stats = settle_step(queued, self.state, global_batch=self.global_batch,
                            stop_after_nonfinite=self.stop_after_nonfinite)
        self.state.batch_in_epoch += queued.micro_batches
        self.issues.record(queued.issues)
        if generators_at_step is None:
            return on_step(stats)
        generators_now = GeneratorStates.of(self.accelerator.device)
        generators_at_step.restore()
        if on_step(stats):
            return True
        generators_now.restore()
        return False


def input_memory_format(model: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` when the model holds channels-last 4-D weights (its input should match), else
    contiguous."""
    channels_last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                        for p in model.parameters())
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclasses.dataclass
class GeneratorStates:
    """The states of torch's default random number generators a training step draws from (stochastic depth):
    the CPU's, and the training device's when that is an accelerator (CUDA, XPU, MPS)."""

    device: torch.device
    cpu: Tensor
    accelerator: Tensor | None

    @classmethod
    def of(cls, device: torch.device) -> GeneratorStates:
        on_device = torch.get_device_module(device).get_rng_state(device) if device.type != "cpu" else None
        return cls(device, torch.get_rng_state(), on_device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(self.device).set_rng_state(self.accelerator, self.device)


@dataclasses.dataclass
class HostRead:
    """The loss and gradient norm of a queued step on their way to the host.

    Attributes:
        values: (2,) float32, loss then norm: in pinned host memory once ``done`` has passed, or on the device
            (or the CPU) when ``done`` is None.
        done: marks the copy's end on a CUDA stream.
    """

    values: Tensor
    done: torch.cuda.Event | None = None

    def wait(self) -> tuple[float, float]:
        """The two values as Python floats; waits for the device's work up to the copy only."""
        if self.done is not None:
            self.done.synchronize()
        loss, grad_norm = self.values.tolist()
        return loss, grad_norm


@dataclasses.dataclass
class QueuedStep:
    """An optimizer step whose update is queued; what the host learns from it once it reads.

    Attributes:
        lr: the step's learning rate.
        read: its loss (mean over micro-batches and processes) and global gradient norm.
        fp16_overflow: a finite loss with overflowing gradients, stepped through the scaler (checked on the
            host only).
        micro_batches, issues: the micro-batches it stepped over and their data issues (the pretraining loop's).
    """

    lr: float
    read: HostRead
    fp16_overflow: bool = False
    micro_batches: int = 0
    issues: list[Any] = dataclasses.field(default_factory=list)


def optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                   schedule: Callable[[int], float], state: TrainState, local_loss: Tensor, *, global_batch: int,
                   clip_grad: float | None, stop_after_nonfinite: int) -> StepStats:
    """One optimizer step, queued and read at once (finetuning's loop): :func:`queue_optimizer_step`, then
    :func:`settle_step`."""
    queued = queue_optimizer_step(accelerator, model, optimizer, schedule, state, local_loss, clip_grad=clip_grad)
    return settle_step(queued, state, global_batch=global_batch, stop_after_nonfinite=stop_after_nonfinite)


def queue_optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                         schedule: Callable[[int], float], state: TrainState, local_loss: Tensor, *,
                         clip_grad: float | None) -> QueuedStep:
    """Set the lr from ``schedule(state.step)``, clip, check finiteness on every process alike, then step or
    skip (see the module docstring). Where the check runs on the device, nothing waits for it here."""
    acc = accelerator
    lr = schedule(state.step)
    apply_lr(optimizer, lr)
    grad_norm = clip_gradients(acc, model.parameters(), clip_grad)
    loss = acc.reduce(local_loss, reduction="mean")
    if acc.scaler is None and skips_on_device(optimizer):
        return QueuedStep(lr, step_checked_on_device(optimizer, loss, grad_norm))
    loss_value, norm_value, fp16_overflow = step_checked_on_host(acc, optimizer, loss, grad_norm)
    return QueuedStep(lr, HostRead(torch.tensor([loss_value, norm_value])), fp16_overflow)


def settle_step(queued: QueuedStep, state: TrainState, *, global_batch: int,
                stop_after_nonfinite: int) -> StepStats:
    """Wait for a queued step's loss and norm, then count it in ``state``.

    Raises:
        NonFiniteLossError: ``stop_after_nonfinite`` non-finite steps in a row.
    """
    loss, grad_norm = queued.read.wait()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite or queued.fp16_overflow:
        state.nonfinite_in_a_row = 0
    else:
        state.nonfinite_in_a_row += 1
        state.nonfinite_total += 1
    state.step += 1
    state.images_seen += global_batch
    if state.nonfinite_in_a_row >= stop_after_nonfinite:
        raise NonFiniteLossError(
            f"{state.nonfinite_in_a_row} optimizer steps in a row (up to step {state.step}) had a non-finite "
            f"loss or gradient (last loss {loss}, grad norm {grad_norm}); stopping without saving. The last "
            f"checkpoint is intact. Try a lower optim.blr, optim.clip_grad, or bf16 instead of fp16."
        )
    return StepStats(loss=loss, lr=queued.lr, grad_norm=grad_norm, skipped=not finite)


def unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (or ``optimizer`` itself when unwrapped)."""
    return getattr(optimizer, "optimizer", optimizer)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer honours a ``found_inf`` flag on the device: the contract ``torch.amp.GradScaler``
    relies on, which torch's fused optimizers declare."""
    return getattr(unwrapped(optimizer), "_step_supports_amp_scaling", False)


def step_checked_on_device(optimizer: torch.optim.Optimizer, loss: Tensor, grad_norm: Tensor) -> HostRead:
    """Queue the step, skipped on the device (parameters, moments and step counts untouched) when the ()
    ``loss`` or ``grad_norm`` is not finite, and drop the gradients; then start the two's copy to the host."""
    inner = unwrapped(optimizer)
    inner.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    try:
        optimizer.step()
    finally:
        del inner.found_inf
    optimizer.zero_grad(set_to_none=True)
    return start_host_read(loss, grad_norm)


def step_checked_on_host(accelerator: Accelerator, optimizer: torch.optim.Optimizer, loss: Tensor,
                         grad_norm: Tensor) -> tuple[float, float, bool]:
    """Wait for the () ``loss`` and ``grad_norm``, step unless one is not finite, drop the gradients.

    Returns:
        The loss, the gradient norm, and whether this was an fp16 overflow: a finite loss with overflowing
        gradients, stepped through the scaler, which skips that update itself.
    """
    loss_value, norm_value = host_values(loss, grad_norm)
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    fp16_overflow = accelerator.scaler is not None and math.isfinite(loss_value) and not finite
    if finite or fp16_overflow:
        optimizer.step()
    elif accelerator.scaler is not None:
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, fp16_overflow


def host_values(loss: Tensor, grad_norm: Tensor) -> tuple[float, float]:
    """The two () tensors as Python floats, in one copy (one wait for the device)."""
    loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()
    return loss_value, norm_value


def start_host_read(loss: Tensor, grad_norm: Tensor) -> HostRead:
    """Queue the copy of the two () tensors to the host. On CUDA it goes to pinned memory behind an event, so
    that waiting for it does not wait for work queued after it."""
    values = torch.stack([loss.float(), grad_norm.float()])
    if values.device.type != "cuda":
        return HostRead(values)
    host = torch.empty(2, dtype=torch.float32, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(values.device))
    return HostRead(host, done)


def parameters_finite(accelerator: Accelerator, model: nn.Module) -> bool:
    """True when every parameter on every process is finite (one reduction)."""
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    flag = (~finite).float().reshape(1).to(accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0
