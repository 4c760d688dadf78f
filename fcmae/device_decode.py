"""Training JPEGs decoded, cropped and flipped on the training GPU (``data.decode_device=cuda``).

Loader workers read each file's header and bytes and draw the sample's crop and flip from the sample's
keyed generator before any pixel is decoded, exactly as the CPU path does
(:meth:`PretrainTransform.plan`). Their collate packs a batch's files into one byte buffer
(:func:`pack_encoded`), in one of the worker's reused shared-memory slots (:mod:`fcmae.worker_slots`), so
the workers stay plain CPU processes. In the training process,
:func:`decode_ahead` runs :class:`DeviceCropDecoder` in a background thread, a few batches ahead of the
loop. nvJPEG's hardware decoder, called directly (:mod:`fcmae.nvjpeg`, ``data.gpu_decoder=direct``),
decodes the batch's files on the thread's high-priority stream; ``torchvision.io.decode_jpeg`` decodes
those it does not take (all of them with ``data.gpu_decoder=torchvision``, or where the GPU has no
hardware decoder) on torchvision's own stream while the thread waits. Then the thread's stream crops,
resizes (bicubic, antialiased) and flips them. A second thread receives the workers' batches a few ahead
of the decoding thread. The loop gets uint8 ``(B, C, S, S)`` pixels already on the GPU. One CUDA context
does all the work, so decoding overlaps the training kernels instead of taking turns with them.

Images nvJPEG is not given are decoded on the CPU in the worker, as without this option: not a JPEG, an
EXIF rotation, a CMYK JPEG, a file with no end-of-image marker in its last 4 KiB (likely truncated, which
PIL reports), and the first ``data.cpu_decode_share`` of each batch's samples, which the workers decode so
that they share the work with the GPU. A file the device decoder refuses is redone on the CPU by the
decoding thread. So broken files are skipped and reported as on the CPU, unless nvJPEG decodes one
despite its damage. Device faults (out of memory, a failed kernel, also when torchvision reports them as a
plain RuntimeError) stop the run instead.

Everything here also runs on a CPU device (libjpeg-turbo behind ``decode_jpeg``), which the tests use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from fcmae.crop_resize import crop_and_resize
from fcmae.data import ImageSource, PretrainImages, first_good
from fcmae.images import MODES_BY_CHANNELS, can_reduce, jpeg_bytes, open_image
from fcmae.nvjpeg import HardwareDecoderUnavailable, HardwareJpegDecoder, NvjpegError
from fcmae.pretrain_config import GPU_DECODERS, DataConfig
from fcmae.transforms import PretrainTransform, keyed_generator
from fcmae.worker_slots import SlotPlacement, WorkerSlots, fresh_tensors

DEVICE_READ_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY}
CHANNELS = {mode: channels for channels, mode in MODES_BY_CHANNELS.items()}
_END = object()  # a background thread's items are exhausted
# Decoded pixels held at once per decode call (or one larger image): bounds the device memory a batch of
# huge photos needs.
DECODE_PIXELS_PER_CALL = 1 << 26
# Batches decoded ahead of the training loop (each holds its (B, C, S, S) pixels on the device).
DECODE_AHEAD = 2
# Loader batches received ahead of the decoding thread. Receiving one (about 16 MB through shared memory)
# takes milliseconds that the decoding thread would otherwise wait for.
RECEIVE_AHEAD = 4
# Faults of the device, not of a file: they stop the run rather than send every file to the CPU.
_DEVICE_FAULTS = (torch.OutOfMemoryError, torch.AcceleratorError)
# Batches in a row the direct decoder may fail (each then decoded file by file) before torchvision's takes over.
DIRECT_FAILURES_IN_A_ROW = 3
# torchvision re-raises what fails inside its nvJPEG call as a plain RuntimeError; these name a device fault.
_DEVICE_FAULT_WORDS = ("out of memory", "CUDA error")

logger = logging.getLogger(__name__)


@dataclass
class EncodedCrop:
    """A JPEG's bytes and the sample's augmentation, for the training process to decode on the device.

    Attributes:
        data: (N,) uint8, the whole file.
        pixels: width x height of the image (from its header).
        box: (top, left, height, width) crop in the image's pixels.
        flip: mirror the crop horizontally.
        key: the sample's (epoch, index), to redo it on the CPU if the device decoder refuses it.
    """

    data: Tensor
    pixels: int
    box: tuple[int, int, int, int]
    flip: bool
    key: tuple[int, int]


def device_decodable(img: Image.Image, mode: str) -> bool:
    """Whether an opened image can be decoded by nvJPEG into ``mode`` as PIL would: an undecoded JPEG in L or
    RGB, without EXIF rotation, for an L or RGB target."""
    return mode in DEVICE_READ_MODES and img.mode in DEVICE_READ_MODES and can_reduce(img)


class EncodedPretrainImages(PretrainImages):
    """:class:`PretrainImages` whose JPEGs leave the worker undecoded: key (epoch, index) ->
    ``{"encoded": EncodedCrop, "issues"}``, or ``{"pixel_values": (C, S, S) uint8, "issues"}`` for an image
    decoded on the CPU.

    A batch fetched whole (:meth:`__getitems__`, as the loader's workers do) has its first
    ``round(data.cpu_decode_share * B)`` samples decoded on the CPU, so that the workers take that share
    of the decoding off the GPU's decoding thread.
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform, cfg: DataConfig, in_chans: int,
                 seed: int):
        super().__init__(source, transform, cfg, in_chans, seed)
        self.cpu_share = cfg.cpu_decode_share

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """The items of one batch's keys, its first ``round(cpu_decode_share * len(keys))`` decoded here."""
        on_cpu = round(self.cpu_share * len(keys))
        return [self.decoded_on_cpu(key) if position < on_cpu else self[key] for position, key in enumerate(keys)]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key

        def plan_or_decode(source: Any) -> tuple[EncodedCrop | Tensor, list[str]]:
            generator = keyed_generator(self.seed, epoch, index)
            img = open_image(source, self.max_pixels)
            data = jpeg_bytes(img) if device_decodable(img, self.mode) else None
            if data is None:
                return self.transform(img, generator, self.mode)
            plan = self.transform.plan(img.width, img.height, generator)
            crop = EncodedCrop(data, img.width * img.height, plan.box, plan.flip, key)
            channels = ["channels"] if img.mode != self.mode else []
            img.close()
            return crop, channels + plan.notes

        x, _, issues = first_good(lambda i: self.dataset[i][self.column], index, len(self), plan_or_decode,
                                  self.max_bad)
        return {"encoded" if isinstance(x, EncodedCrop) else "pixel_values": x, "issues": issues}

    def decoded_on_cpu(self, key: tuple[int, int]) -> dict[str, Any]:
        """The item as :class:`PretrainImages` makes it (the batch's CPU share, or a file the device decoder
        refused)."""
        return super().__getitem__(key)


@dataclass
class EncodedBatch:
    """A micro-batch as loader workers hand it over: its JPEGs undecoded in one buffer, the rest decoded.

    Attributes:
        files: (N,) uint8, the batch's JPEG files back to back.
        sizes: bytes of each file in ``files``.
        crops: per sample in batch order, its :class:`EncodedCrop` (``data`` empty; the bytes are in
            ``files``) or None for a sample decoded on the CPU.
        decoded: (K, C, S, S) uint8, the CPU-decoded samples in batch order ((0,) when none).
        issues: per sample, what its decoding reported.
        placement: where a worker placed ``files`` and ``decoded`` in one of its shared-memory slots (see
            :mod:`fcmae.worker_slots`), or None. A placed batch is pickled (and ``copy.copy``-ed) without those
            two tensors; :meth:`DeviceCropDecoder.receive` views them in the slot again, which stays the
            batch's while its placement lives (a ``dataclasses.replace`` copy shares it).
    """

    files: Tensor | None
    sizes: list[int]
    crops: list[EncodedCrop | None]
    decoded: Tensor | None
    issues: list[list[Any]]
    placement: SlotPlacement | None = None

    def __getstate__(self) -> dict[str, Any]:
        if self.placement is None:
            return self.__dict__
        return dict(self.__dict__, files=None, decoded=None)


def worker_slots(workers: int, prefetch: int) -> WorkerSlots:
    """Slots for each of ``workers`` loader workers: its ``prefetch`` batches the loader has asked for and not yet
    returned (being filled, queued, or kept back for an earlier one), its share of those the training process
    holds (the receiving and decoding threads' queues, one in hand in each, one in the training loop), and a
    spare, for a batch let go a moment late."""
    held = RECEIVE_AHEAD + DECODE_AHEAD + 3
    return WorkerSlots(prefetch + math.ceil(held / workers) + 1)


def pack_encoded(items: list[dict[str, Any]], slots: WorkerSlots | None = None) -> EncodedBatch:
    """Collate of :class:`EncodedPretrainImages` items inside a worker: no decoding, one byte buffer, in one
    of the worker's ``slots`` when one is free."""
    jpegs = [item["encoded"].data for item in items if "encoded" in item]
    decoded = [item["pixel_values"] for item in items if "encoded" not in item]
    sizes = [data.numel() for data in jpegs]
    shapes = [(sum(sizes),), (len(decoded), *decoded[0].shape) if decoded else (0,)]
    (files, pixels), placement = slots.reserve(shapes) if slots is not None else (fresh_tensors(shapes), None)
    if jpegs:
        torch.cat(jpegs, out=files)
    if decoded:
        torch.stack(decoded, out=pixels)
    empty = torch.empty(0, dtype=torch.uint8)
    return EncodedBatch(
        files=files,
        sizes=sizes,
        crops=[dataclasses.replace(item["encoded"], data=empty) if "encoded" in item else None for item in items],
        decoded=pixels,
        issues=[item["issues"] for item in items],
        placement=placement,
    )


class DeviceCropDecoder:
    """:class:`EncodedBatch` -> ``{"pixel_values": (B, C, S, S) uint8 on device, "issues", "worker_batch"}``,
    like :func:`fcmae.data.collate_examples` of the CPU path's items.

    ``worker_batch`` is the :class:`EncodedBatch` itself. Its buffers came from a loader worker through shared
    memory: dropping the batch frees its worker's slot (:mod:`fcmae.worker_slots`), or, for a batch in fresh
    memory, unmaps it, which holds the GIL for milliseconds (about 2.4 ms for 16 MB, call 32). The batch
    therefore travels with its pixels to the training loop, which drops it once its step's GPU work is queued:
    the worker does not refill the slot while the decoder may still read it, and an unmap does not happen in the
    decoding thread at a moment when the loop needs the GIL.

    Args:
        size: output side S.
        device: where to decode (a CUDA device; a CPU device decodes with libjpeg-turbo, for tests).
        images: the dataset whose batches it decodes (it redoes refused files on the CPU).
        gpu_decoder: ``data.gpu_decoder`` on a CUDA device: ``direct`` decodes with
            :class:`fcmae.nvjpeg.HardwareJpegDecoder` what it takes and with torchvision the rest (all of it
            where the GPU has no hardware decoder, which is logged once, or after the direct decoder failed
            :data:`DIRECT_FAILURES_IN_A_ROW` batches in a row); ``torchvision`` decodes everything with
            ``torchvision.io.decode_jpeg``.

    Raises:
        ValueError: an unknown ``gpu_decoder``.
    """

    def __init__(self, size: int, device: torch.device, images: EncodedPretrainImages,
                 gpu_decoder: str = "direct"):
        if gpu_decoder not in GPU_DECODERS:
            raise ValueError(f"gpu_decoder must be one of {GPU_DECODERS}, got {gpu_decoder!r}")
        self.size, self.device, self.images = size, device, images
        self.gpu_decoder = gpu_decoder
        self.refused = 0
        self._hardware: HardwareJpegDecoder | None = None
        self._hardware_tried = False
        self._direct_failures = 0  # batches in a row
        self._direct_failure_logged = False

    def receive(self, batch: EncodedBatch) -> None:
        """View a placed batch's ``files`` and ``decoded`` in its worker's slot again (freed with the batch's
        placement)."""
        if batch.placement is not None and batch.files is None:
            batch.files, batch.decoded = batch.placement.tensors()

    def __call__(self, batch: EncodedBatch) -> dict[str, Any]:
        self.receive(batch)
        on_device = [i for i, crop in enumerate(batch.crops) if crop is not None]
        crops, refused = self.crop_on_device([batch.crops[i] for i in on_device],
                                             list(batch.files.split(batch.sizes)))
        issues = list(batch.issues)
        if len(on_device) == len(batch.crops) and not refused:  # the usual batch: nothing to place
            pixels = crops
        else:
            refused_set = set(refused)
            cropped = [i for j, i in enumerate(on_device) if j not in refused_set]
            pixels = self._assemble(batch, cropped, crops, [on_device[j] for j in refused], issues)
        return {"pixel_values": pixels, "issues": [issue for item in issues for issue in item], "worker_batch": batch}

    def _assemble(self, batch: EncodedBatch, cropped: list[int], crops: Tensor, refused: list[int],
                  issues: list[list[Any]]) -> Tensor:
        """(B, C, S, S) in batch order: ``crops`` at positions ``cropped``, the workers' CPU-decoded samples,
        and the ``refused`` files redone on the CPU here (their ``issues`` replaced by the CPU item's: a
        skipped file, a replacement)."""
        pixels = torch.empty((len(batch.crops), CHANNELS[self.images.mode], self.size, self.size),
                             dtype=torch.uint8, device=self.device)
        if cropped:
            pixels[cropped] = crops
        on_cpu = [i for i, crop in enumerate(batch.crops) if crop is None]
        if on_cpu:
            # Pageable memory is staged before the call returns, so nothing waits for the decoding stream.
            pixels[on_cpu] = batch.decoded.to(self.device, non_blocking=True)
        for i in refused:
            item = self.images.decoded_on_cpu(batch.crops[i].key)
            pixels[i], issues[i] = item["pixel_values"].to(self.device), item["issues"]
        return pixels

    def crop_on_device(self, encoded: list[EncodedCrop], files: list[Tensor]) -> tuple[Tensor, list[int]]:
        """Decode ``files`` ((N_i,) uint8, the file of each of ``encoded``) on the device, crop, resize, flip.

        Returns:
            (K, C, S, S) uint8, the crops of the files the device decoder took, in order; and the positions
            in ``encoded`` of those it refused.
        """
        crops, refused, offset = [], [], 0
        for chunk in _chunks([e.pixels for e in encoded], DECODE_PIXELS_PER_CALL):
            decoded = self._decode(files[offset:offset + chunk], encoded[offset:offset + chunk])
            took = [j for j, img in enumerate(decoded) if img is not None]
            refused += [offset + j for j, img in enumerate(decoded) if img is None]
            if took:
                crops.append(crop_and_resize([decoded[j] for j in took], [encoded[offset + j].box for j in took],
                                             self.size, [encoded[offset + j].flip for j in took]))
            offset += chunk
        if not crops:
            return torch.empty((0, CHANNELS[self.images.mode], self.size, self.size), dtype=torch.uint8,
                               device=self.device), refused
        return crops[0] if len(crops) == 1 else torch.cat(crops), refused

    def _decode(self, files: list[Tensor], encoded: list[EncodedCrop]) -> list[Tensor | None]:
        self._wait_for_pending_reads()
        try:
            return self._decode_all(files)
        except RuntimeError as err:  # one bad file fails the call: find it
            if device_fault(err):
                raise
            if isinstance(err, NvjpegError):
                self._direct_failed(err)
            return [self._decode_one(data, e.key) for data, e in zip(files, encoded, strict=True)]

    def _decode_all(self, files: list[Tensor]) -> list[Tensor]:
        hardware = self._hardware_decoder()
        if hardware is None:
            return decode_jpeg(files, mode=self._read_mode(), device=self.device)
        images = hardware.decode(files, CHANNELS[self.images.mode])
        self._direct_failures = 0
        rest = [i for i, image in enumerate(images) if image is None]
        if rest:
            for i, image in zip(rest, decode_jpeg([files[i] for i in rest], mode=self._read_mode(),
                                                  device=self.device), strict=True):
                images[i] = image
        return images

    def _direct_failed(self, err: NvjpegError) -> None:
        """Note a batch the direct decoder failed (its files are then decoded one by one): the first is logged,
        and after :data:`DIRECT_FAILURES_IN_A_ROW` in a row torchvision's decoder takes over."""
        self._direct_failures += 1
        if self._direct_failures == DIRECT_FAILURES_IN_A_ROW:
            self._hardware = None
            logger.warning("the direct decoder failed %d batches in a row (%s); torchvision's decoder decodes "
                           "from now on", self._direct_failures, err)
        elif not self._direct_failure_logged:
            logger.warning("the direct decoder failed a batch (%s); its files are decoded one by one", err)
        self._direct_failure_logged = True

    def _hardware_decoder(self) -> HardwareJpegDecoder | None:
        """The direct hardware decoder, made on first use (in the decoding thread, on the primary context)."""
        if not self._hardware_tried:
            self._hardware_tried = True
            self._hardware = hardware_decoder(self.device, self.gpu_decoder)
        return self._hardware

    def _wait_for_pending_reads(self) -> None:
        """torchvision's nvJPEG call writes its output on a stream of its own, into memory taken on the current
        stream, which may hold the last chunk's images while queued kernels still read them: let those finish
        first. The direct decoder is given the current stream, but nvJPEG does not document that its engines'
        writes wait for the work queued there, so it waits too."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _decode_one(self, data: Tensor, key: tuple[int, int]) -> Tensor | None:
        self._wait_for_pending_reads()
        try:
            return decode_jpeg(data, mode=self._read_mode(), device=self.device)
        except RuntimeError as err:
            if device_fault(err):
                raise
            self.refused += 1
            if self.refused == 1:
                logger.warning("the device decoder refused sample %s (%s); it and any later refusals are "
                               "decoded on the CPU", key, err)
            return None

    def _read_mode(self) -> ImageReadMode:
        return DEVICE_READ_MODES[self.images.mode]


def decode_ahead(batches: Iterable[EncodedBatch], decoder: DeviceCropDecoder,
                 depth: int = DECODE_AHEAD) -> Iterator[dict[str, Any]]:
    """``decoder(batch)`` for each of ``batches``, computed up to ``depth`` batches ahead in a background
    thread (on a high-priority CUDA stream of its own when the decoder's device is a GPU).

    A second thread pulls ``batches`` (the loader's iterator) up to :data:`RECEIVE_AHEAD` batches ahead
    of the decoding thread. An error in either is raised here, at the batch where it happened. Closing
    this iterator stops both threads.
    """
    device = decoder.device
    # High priority: the GPU runs the decoder's few small kernels as soon as it can, so the thread does
    # not wait behind the training step for them; they take little from it.
    stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    def decoded() -> Iterator[tuple[dict[str, Any], torch.cuda.Event | None]]:
        if stream is not None:  # a new thread starts on GPU 0; leaving the stream context returns there
            torch.cuda.set_device(device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(), \
                contextlib.closing(_in_thread(batches, RECEIVE_AHEAD, "fcmae-receive")) as received:
            for batch in received:
                box = [decoder(batch)]
                del batch  # a name would hold the batch past the yield (see _in_thread)
                yield box.pop(), stream.record_event() if stream is not None else None

    with contextlib.closing(_in_thread(decoded(), depth, "fcmae-device-decode")) as ready:
        for out, done in ready:
            if done is not None:  # the loop's stream reads what the decoding stream wrote
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(done)
                out["pixel_values"].record_stream(consumer)
            box = [out]
            del out
            yield box.pop()


def _in_thread(items: Iterable[Any], depth: int, name: str) -> Iterator[Any]:
    """The items of ``items``, pulled up to ``depth`` ahead by a daemon thread called ``name``.

    An error while pulling is raised here after the items before it. Closing this iterator stops the
    thread (after the pull it is in, if any) and closes ``items``' iterator. Neither keeps a reference to an
    item it has passed on, so an item is freed in the thread of whoever drops it last (here and in
    :func:`decode_ahead`, a generator or loop variable would otherwise hold it until the next item).
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        source = iter(items)
        try:
            for item in source:
                offered = offer(item)
                del item
                if not offered:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            offer(e)
            return
        finally:
            if hasattr(source, "close"):
                source.close()
        offer(_END)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            box = [ready.get()]  # yielded out of the box: a name would hold the item until the next one
            if box[0] is _END:
                break
            if isinstance(box[0], BaseException):
                raise box[0]
            yield box.pop()
    finally:
        stop.set()
        if thread is not threading.current_thread():  # a generator collected in a cycle may close in it
            thread.join()


def hardware_decoder(device: torch.device, gpu_decoder: str) -> HardwareJpegDecoder | None:
    """The direct hardware decoder for ``device`` under ``data.gpu_decoder``: None for torchvision's decoder, on
    a CPU device, or where it cannot be made (logged)."""
    if gpu_decoder != "direct" or device.type != "cuda":
        return None
    try:
        return HardwareJpegDecoder(device)
    except HardwareDecoderUnavailable as err:
        logger.warning("data.gpu_decoder=direct: %s; torchvision's decoder decodes instead", err)
        return None


def device_fault(err: RuntimeError) -> bool:
    """Whether a decode call failed because of the device (which stops the run), not because of a file."""
    return isinstance(err, _DEVICE_FAULTS) or any(words in str(err) for words in _DEVICE_FAULT_WORDS)


def _chunks(pixels: list[int], pixels_per_chunk: int) -> list[int]:
    """Lengths of consecutive runs of images of at most ``pixels_per_chunk`` pixels together, or of one larger
    image."""
    chunks: list[int] = []
    total = pixels_per_chunk
    for count in pixels:
        if total + count > pixels_per_chunk:
            chunks.append(0)
            total = 0
        chunks[-1] += 1
        total += count
    return chunks
