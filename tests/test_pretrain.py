"""End-to-end pretraining on CPU: image folder, in-memory dataset, learning, exact resume, bad data."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import models
from fcmae.pretraining import run_pretraining
from tests.pretrain_helpers import random_image, reset_accelerate, tiny_config, write_images


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def events(run_dir, name):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_end_to_end_on_an_image_folder(tmp_path):
    write_images(tmp_path / "images", 12, classes=3)
    cfg = tiny_config(tmp_path / "run", f"data.path={tmp_path / 'images'}", "train.epochs=2",
                      "log.preview_every_steps=2")
    run_dir = run_pretraining(cfg)
    metrics = events(run_dir, "metrics")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)
    assert {"train/lr", "train/grad_norm", "train/images_per_s", "train/memory_gib"} <= set(metrics[0])
    start = events(run_dir, "start")[0]
    assert start["effective_batch"] == 4 and start["lr"] == pytest.approx(1.5e-4 * 4 / 256)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_00000003",
                                                                           "checkpoint_00000006"]
    assert (run_dir / "previews" / "step_00000006.png").is_file()
    assert Image.open(run_dir / "previews" / "step_00000002.png").size == (3 * 64 + 4, 4 * 64 + 6)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run_info.json").is_file()
    end = events(run_dir, "end")[0]
    assert end["step"] == 6 and end["ranks_agree"] and end["data_issues"] == "0 images skipped; 0 converted"


def test_weights_are_written_for_use(tmp_path):
    cfg = tiny_config(tmp_path / "run", "data.generated_images=8", "train.epochs=1")
    run_dir = run_pretraining(cfg)
    full = load_file(run_dir / "weights" / "fcmae.safetensors")
    encoder = load_file(run_dir / "weights" / "encoder.safetensors")
    assert {"mask_token", "proj.weight", "pred.weight"} <= set(full)
    reference = models.create_model("convnextv2_test", with_head=False).state_dict()
    assert set(encoder) == set(reference)
    assert all(torch.equal(encoder[k], full[f"encoder.{k}"]) for k in encoder)
    weights = run_dir / "weights" / "encoder.safetensors"
    model = models.create_model("convnextv2_test", with_head=False, pretrained=weights)
    assert torch.equal(model.stem[0].weight, encoder["stem.0.weight"])


def test_end_to_end_on_an_in_memory_dataset(tmp_path):
    ds = datasets.Dataset.from_dict({"img": [random_image(i, mode="L") for i in range(8)], "label": list(range(8))},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    cfg = tiny_config(tmp_path / "run", "train.epochs=1", "train.max_steps=2")
    run_dir = run_pretraining(cfg, dataset=ds)
    assert [m["step"] for m in events(run_dir, "metrics")] == [1, 2]
    assert (run_dir / "checkpoints" / "checkpoint_00000002" / "model.safetensors").is_file()
    assert (run_dir / "weights" / "encoder.safetensors").is_file()
    assert (run_dir / "previews" / "step_00000002.png").is_file()
    assert events(run_dir, "end")[0]["data_issues"] == "0 images skipped; 8 converted (channels 8)"


def test_overfitting_a_fixed_batch_drives_the_loss_down(tmp_path):
    cfg = tiny_config(tmp_path / "run", "data.generated_images=2", "train.batch_size=2", "data.crop_scale=[1.0, 1.0]",
                      "data.crop_ratio=[1.0, 1.0]", "data.hflip=0.0", "model.decoder_embed_dim=64",
                      "train.epochs=60", "optim.lr=3e-3", "optim.warmup_epochs=5", "optim.min_lr=1e-3",
                      "checkpoint.every_epochs=1000")
    losses = [m["train/loss"] for m in events(run_pretraining(cfg), "metrics")]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_resume_continues_exactly(tmp_path):
    common = ["data.generated_images=16", "train.batch_size=2", "train.gradient_accumulation_steps=2",
              "train.epochs=3", "model.drop_path_rate=0.2", "checkpoint.every_steps=3", "checkpoint.keep_last=2"]
    straight = run_pretraining(tiny_config(tmp_path / "a", *common, "train.max_steps=10"))
    run_pretraining(tiny_config(tmp_path / "b", *common, "train.max_steps=5"))
    reset_accelerate()
    resumed = run_pretraining(tiny_config(tmp_path / "b", *common, "train.max_steps=10"))
    assert events(resumed, "resume")[0]["step"] == 5
    a = load_file(straight / "weights" / "fcmae.safetensors")
    b = load_file(resumed / "weights" / "fcmae.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    loss_a = {m["step"]: m["train/loss"] for m in events(straight, "metrics")}
    loss_b = {m["step"]: m["train/loss"] for m in events(resumed, "metrics")}
    assert all(loss_b[s] == pytest.approx(loss_a[s], abs=1e-6) for s in range(6, 11))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint_00000009",
                                                                           "checkpoint_00000010"]


def test_folder_with_corrupt_and_non_image_files_still_trains(tmp_path, caplog):
    folder = tmp_path / "images"
    write_images(folder, 8)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "empty.png").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored: not an image extension")
    cfg = tiny_config(tmp_path / "run", f"data.path={folder}", "train.epochs=3")
    with caplog.at_level("WARNING"):
        run_dir = run_pretraining(cfg)
    end = events(run_dir, "end")[0]
    assert end["step"] == 6
    skipped = int(end["data_issues"].split()[0])
    assert skipped > 0 and end["data_issues"] == f"{skipped} images skipped (corrupt {skipped}); 0 converted"
    named = {name for r in caplog.records for name in ("broken.jpg", "empty.png", "readme.txt") if name in r.message}
    assert named == {"broken.jpg", "empty.png"}


def test_resume_into_another_runs_folder_is_a_clear_error(tmp_path):
    from fcmae.run_state import ResumeError

    write_images(tmp_path / "images", 8)
    run_pretraining(tiny_config(tmp_path / "run", f"data.path={tmp_path / 'images'}", "train.epochs=1"))
    reset_accelerate()
    other = tiny_config(tmp_path / "run", f"data.path={tmp_path / 'images'}", "train.epochs=2",
                        "model.decoder_embed_dim=24")
    with pytest.raises(ResumeError, match="does not fit this run .*new folder.*checkpoint.resume=false"):
        run_pretraining(other)


def test_compile_mode_reaches_accelerate(tmp_path):
    from fcmae.pretraining import build_accelerator

    cfg = tiny_config(tmp_path / "run", "train.compile=true", "train.compile_mode=reduce-overhead")
    assert cfg.train.captures_cuda_graphs
    assert build_accelerator(cfg, tmp_path / "run").state.dynamo_plugin.mode == "reduce-overhead"


def test_cuda_graph_iterations_begin_once_per_optimizer_step(tmp_path, monkeypatch):
    """With accumulation, the micro-batches of one step share a graph iteration: the gradients of the first
    live in graph memory until the optimizer step reads them."""
    import dataclasses

    from fcmae.pretraining import PretrainingRun

    cfg = tiny_config(tmp_path / "run", "data.generated_images=24", "train.batch_size=2",
                      "train.gradient_accumulation_steps=3")
    run = PretrainingRun(cfg)
    pulled, micro_batches_seen = [], []

    def counted(batches):
        for batch in batches:
            pulled.append(batch)
            yield batch

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: micro_batches_seen.append(len(pulled)))
    steps = []
    engine = dataclasses.replace(run.engine(), cuda_graphs=True)
    engine.train_one_epoch(counted(run.loader.epoch(0)), lambda stats: steps.append(stats) or len(steps) == 3)
    assert micro_batches_seen == [1, 4, 7, 10]  # the fourth step's first micro-batch is queued, then dropped
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in steps)


def test_the_loop_frees_each_batch_before_its_optimizer_step_waits_for_the_gpu(tmp_path, monkeypatch):
    """A batch may hold a loader worker's shared memory, whose unmapping holds the GIL: the loop lets go of it
    once the micro-batch's GPU work is queued, not at the next batch, when the GPU waits on the host."""
    import itertools
    import weakref

    from fcmae.engine import Engine
    from fcmae.pretraining import PretrainingRun

    run = PretrainingRun(tiny_config(tmp_path / "run", "data.generated_images=8", "train.batch_size=2"))
    freed, freed_at_step = [], []
    prepared = [dict(batch, held=Marker()) for batch in itertools.islice(run.loader.epoch(0), 3)]
    for batch in prepared:
        weakref.finalize(batch["held"], freed.append, True)
    del batch

    def handed_over():  # keeps no reference to what it yielded
        while prepared:
            yield prepared.pop(0)

    settle = Engine.settle
    monkeypatch.setattr(Engine, "settle",
                        lambda self, *args: freed_at_step.append(len(freed)) or settle(self, *args))
    steps = []
    run.engine().train_one_epoch(handed_over(), lambda stats: steps.append(stats) or len(steps) == 3)
    assert freed_at_step == [2, 3, 3]  # a step is read once the next micro-batch is queued, the last at the end


def test_on_step_sees_its_own_step_and_a_stop_leaves_no_trace_of_the_micro_batch_queued_after_it(tmp_path):
    """Step n is read once step n + 1's first micro-batch is queued. The state and random generators on_step
    sees are step n's, and after a stop the run trains on from its data position to the weights of a run that
    never stopped (stochastic depth draws from the default generators)."""
    from fcmae.pretraining import PretrainingRun

    common = ["data.generated_images=16", "train.batch_size=2", "train.gradient_accumulation_steps=2",
              "model.drop_path_rate=0.5"]
    straight = PretrainingRun(tiny_config(tmp_path / "a", *common))
    straight.engine().train_one_epoch(straight.loader.epoch(0), lambda stats: False)
    expected = [p.detach().clone() for p in straight.model.parameters()]
    reset_accelerate()
    run = PretrainingRun(tiny_config(tmp_path / "b", *common))
    seen = []

    def stop_at_step_2(stats):
        seen.append((run.state.step, run.state.batch_in_epoch, torch.random.get_rng_state()))
        return run.state.step == 2

    assert run.engine().train_one_epoch(run.loader.epoch(0), stop_at_step_2)
    assert [(step, position) for step, position, _ in seen] == [(1, 2), (2, 4)]
    assert torch.equal(seen[-1][2], torch.random.get_rng_state())  # left as on_step saw them
    assert all(p.grad is None for p in run.model.parameters())
    assert not run.engine().train_one_epoch(run.loader.epoch(0, run.state.batch_in_epoch), lambda stats: False)
    assert (run.state.step, run.state.batch_in_epoch) == (4, 8)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), expected, strict=True))


def test_the_loop_steps_whatever_an_earlier_accumulation_window_left_behind(tmp_path):
    """accelerate's optimizer wrapper steps only while its process-wide sync flag is set, which an earlier loop
    using accelerate's accumulate() may have left cleared; the pretraining loop does its own accumulation."""
    from fcmae.pretraining import PretrainingRun

    run = PretrainingRun(tiny_config(tmp_path / "run", "data.generated_images=8", "train.batch_size=2"))
    before = [p.detach().clone() for p in run.model.parameters()]
    run.accelerator.gradient_state._set_sync_gradients(False)  # as a window cut short leaves it
    run.engine().train_one_epoch(run.loader.epoch(0), lambda stats: stats is None)
    assert run.state.step == 4
    assert not any(torch.equal(p, q) for p, q in zip(run.model.parameters(), before, strict=True)
                   if p.dim() == 4)  # every conv kernel was updated


class Marker:
    """Something a batch holds, to see when it is freed."""


def test_compiled_run_exports_unprefixed_weights(tmp_path):
    """``train.compile`` wraps the model (``_orig_mod.``); the exported files keep the plain model's keys."""
    cfg = tiny_config(tmp_path / "run", "data.generated_images=8", "train.max_steps=1", "train.compile=true",
                      "model.backend=dense")  # inductor compiles dense on the CPU
    weights = run_pretraining(cfg) / "weights"
    reference = models.create_model("convnextv2_test", with_head=False).state_dict()
    assert set(load_file(weights / "encoder.safetensors")) == set(reference)
    assert all(not k.startswith("_orig_mod.") for k in load_file(weights / "fcmae.safetensors"))
