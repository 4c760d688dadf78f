"""The bad-image zoo: every file is skipped or converted with a counted, named warning; never a crash
and never a silently wrong tensor."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.cli import pretrain_main
from fcmae.data import PretrainImages, collate_examples, load_image_source
from fcmae.images import BadImageError, DataIssues, decode_image, scan_image_folder
from fcmae.pretrain_config import DataConfig
from fcmae.pretraining import run_pretraining
from fcmae.transforms import EvalTransform, PretrainTransform
from tests.pretrain_helpers import TINY, random_image, reset_accelerate, tiny_config, write_images


def png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor lie about its size)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def pixels(img: Image.Image) -> list:
    return np.asarray(img).reshape(-1, len(img.getbands())).tolist()


def exif_rotated() -> bytes:
    """40x20 landscape, red left half, blue right half, tagged 'rotate 90 degrees clockwise to display'."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", exif=exif.tobytes(), quality=95)


def palette(transparent: bool) -> bytes:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    return encoded(img, "PNG", **({"transparency": 1} if transparent else {}))


JPEG = encoded(random_image(0, (64, 64)), "JPEG")

# name -> (bytes, outcome): outcome is "skipped:<kind>" or the list of conversion notes.
ZOO = {
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "skipped:corrupt"),
    "zero_bytes.png": (b"", "skipped:corrupt"),
    "text_named.jpg": (b"just some text, not pixels\n" * 10, "skipped:corrupt"),
    "cmyk.jpg": (encoded(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), ["color-space"]),
    "rgba.png": (encoded(Image.new("RGBA", (40, 40), (255, 0, 0, 128)), "PNG"), ["alpha"]),
    "palette.png": (palette(False), []),
    "palette_transparent.png": (palette(True), ["alpha"]),
    "gray16.png": (png(3, 1, 16, 0, b"\x00" + struct.pack(">3H", 0, 0x8000, 0xFFFF)), ["high-bit-depth", "channels"]),
    "rgb16.png": (png(2, 1, 16, 2, b"\x00" + struct.pack(">6H", 0x8000, 0, 0xFFFF, 0x0100, 0x7F00, 0)),
                  ["high-bit-depth"]),
    "grayscale.png": (encoded(Image.new("L", (40, 40), 77), "PNG"), ["channels"]),
    "tiny.png": (encoded(random_image(1, (5, 3)), "PNG"), []),
    "bomb.png": (png(60_000, 60_000, 8, 0, b""), "skipped:too-large"),
    "exif_rotated.jpg": (exif_rotated(), ["exif"]),
}

EXPECTED_PIXELS = {  # decoded RGB values: conversions must be right, not just quiet
    "rgba.png": [[255, 127, 127]],  # half-transparent red over white
    "palette.png": [[255, 0, 0], [0, 0, 255]],
    "palette_transparent.png": [[255, 0, 0], [255, 255, 255]],
    "gray16.png": [[0, 0, 0], [128, 128, 128], [255, 255, 255]],  # rescaled, not clipped to white
    "rgb16.png": [[128, 0, 255], [1, 127, 0]],
    "grayscale.png": [[77, 77, 77]],
}


@pytest.fixture
def zoo(tmp_path) -> Path:
    folder = tmp_path / "zoo"
    folder.mkdir()
    for name, (payload, _) in ZOO.items():
        (folder / name).write_bytes(payload)
    return folder


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_bad_image_is_refused_or_converted_correctly(zoo, name):
    outcome = ZOO[name][1]
    if isinstance(outcome, str):
        with pytest.raises(BadImageError) as info:
            decode_image(str(zoo / name))
        assert f"skipped:{info.value.kind}" == outcome and str(info.value)
        return
    img, notes = decode_image(str(zoo / name))
    assert img.mode == "RGB" and notes == outcome
    if name in EXPECTED_PIXELS:
        assert sorted(map(tuple, np.unique(pixels(img), axis=0).tolist())) == sorted(map(tuple,
                                                                                        EXPECTED_PIXELS[name]))
    if name == "cmyk.jpg":
        assert np.abs(np.asarray(img, dtype=int) - [255, 0, 0]).max() <= 2
    if name == "exif_rotated.jpg":  # upright: portrait, the red half on top
        assert img.size == (20, 40)
        assert np.abs(np.asarray(img)[5, 10].astype(int) - [255, 0, 0]).max() <= 8
        assert np.abs(np.asarray(img)[35, 10].astype(int) - [0, 0, 255]).max() <= 8


def test_own_pixel_limit_and_pil_bomb_warning_both_refuse():
    big = png(10_000, 10_000, 8, 0, b"")  # above PIL's warning threshold, below its error threshold
    with pytest.raises(BadImageError, match="decompression bomb") as info:
        decode_image(big)
    assert info.value.kind == "too-large"
    with pytest.raises(BadImageError, match="exceeds data.max_image_pixels=1000"):
        decode_image(encoded(random_image(0, (40, 40)), "PNG"), max_pixels=1000)


def test_tensors_from_converted_images_hold_the_right_values(zoo):
    transform = EvalTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    gray = transform(decode_image(str(zoo / "grayscale.png"))[0])
    torch.testing.assert_close(gray, torch.full((3, 32, 32), 77 / 255))
    red = transform(decode_image(str(zoo / "rgba.png"))[0])
    torch.testing.assert_close(red[:, 16, 16], torch.tensor([1.0, 127 / 255, 127 / 255]))


def test_unreadable_file_and_directory_are_reported(tmp_path, monkeypatch):
    write_images(tmp_path / "ok", 2)
    write_images(tmp_path / "locked", 2)
    (tmp_path / "folder.png").mkdir()  # a directory with an image name is walked, not decoded
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths, problems = scan_image_folder(tmp_path)
    assert [Path(p).name for p in paths] == ["img_000.png", "img_001.png"]
    assert sorted((Path(p).name, why.split(":")[0]) for p, why in problems) == [
        ("dangling.jpg", "not a regular file (dangling link, pipe or device)"), ("locked", "cannot list directory")]
    with pytest.raises(BadImageError) as info:
        decode_image(str(tmp_path / "folder.png"))
    assert info.value.kind == "unreadable"
    os.unlink(paths[0])  # vanished between listing and reading
    with pytest.raises(BadImageError) as info:
        decode_image(paths[0])
    assert info.value.kind == "unreadable" and "No such file" in str(info.value)


def test_zoo_folder_yields_only_good_tensors_and_counts_every_kind(zoo):
    write_images(zoo, 3, start_seed=50)
    cfg = DataConfig(path=str(zoo), input_size=32, num_workers=0)
    source = load_image_source(cfg)
    transform = PretrainTransform(32, (0.2, 1.0), (0.75, 4 / 3), 0.5)
    dataset = PretrainImages(source, transform, cfg, in_chans=3, seed=0)
    batch = collate_examples([dataset[(0, i)] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (len(ZOO) + 3, 3, 32, 32)
    assert torch.isfinite(batch["pixel_values"]).all()
    first_pass = {}
    for kind, path, _ in batch["issues"]:
        first_pass.setdefault(Path(path).name, set()).add(kind)
    for name, (_, outcome) in ZOO.items():
        expected = {outcome} if isinstance(outcome, str) else {f"converted:{n}" for n in outcome}
        if name == "tiny.png":
            expected.add("converted:small")
        assert expected <= first_pass.get(name, set()), name
    issues = DataIssues()
    issues.record(batch["issues"])
    assert {k for k in issues.counts if k.startswith("skipped")} == {"skipped:corrupt", "skipped:too-large"}
    assert issues.skipped >= 4 and "images skipped (corrupt" in issues.summary()


def test_training_on_the_zoo_completes_and_reports(zoo):
    write_images(zoo, 5, start_seed=80)
    try:
        run_dir = run_pretraining(tiny_config(zoo.parent / "run", f"data.path={zoo}", "train.epochs=2"))
    finally:
        reset_accelerate()
    end = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["step"] == 8
    assert "images skipped (corrupt" in end["data_issues"] and "converted (" in end["data_issues"]


def test_a_folder_of_non_images_stops_with_one_line(tmp_path, capsys):
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_text("<html>not found</html>")
    with pytest.raises(SystemExit) as info:
        pretrain_main([*TINY, f"output_dir={tmp_path / 'run'}", f"data.path={tmp_path}", "data.max_bad_in_a_row=5"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 5 consecutive files could not be decoded") and "is this an image corpus?" in err
    reset_accelerate()
