"""ConvNeXt V2 state-dict layouts and explicit, bidirectional key maps between them and ours.

Our canonical layout uses timm's names without a prefix, and every key belongs to one *part*:

- ``encoder``: ``stem.*``, ``stages.*``
- ``norm``: ``head.norm.*`` (the LayerNorm after global pooling)
- ``classifier``: ``head.fc.*``
- ``decoder``: ``proj.*``, ``mask_token``, ``decoder.*``, ``pred.*`` (FCMAE only)

Each foreign layout is a table of rules ``(ours, theirs, kind)``. Templates use ``<s>`` (stage 0-3),
``<d>`` (downsampling stage 1-3), ``<b>``/``<j>`` (block index), ``<k>`` (0 or 1) and ``<p>`` (``weight``
or ``bias``); a key must match one rule exactly, whole key, or it is reported as unexpected. ``kind``
names the tensor conversion; each checks the shape it reads. Layout facts: official ConvNeXt V2
``models/convnextv2.py`` (dense), ``models/convnextv2_sparse.py`` + ``models/fcmae.py``
(MinkowskiEngine training checkpoints), timm ``convnext.py``, transformers ``modeling_convnextv2.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from torch import Tensor

from sparse_ops.me_layout import (
    conv_weight_to_me,
    depthwise_weight_to_me,
    me_to_conv_weight,
    me_to_depthwise_weight,
)

_SLOTS = {"s": "[0-3]", "d": "[1-3]", "b": "[0-9]+", "j": "[0-9]+", "k": "[01]", "p": "weight|bias"}
_SLOT = re.compile(r"<([a-z])>")


class LayoutError(ValueError):
    """A state dict that does not follow the layout it was read as."""


@dataclass(frozen=True)
class Rule:
    """``ours`` <-> ``theirs`` key templates and the tensor conversion between them."""

    ours: str
    theirs: str
    kind: str = "same"

    @cached_property
    def theirs_regex(self) -> re.Pattern[str]:
        return _compile(self.theirs)

    @cached_property
    def ours_regex(self) -> re.Pattern[str]:
        return _compile(self.ours)


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\<", "<").replace(r"\>", ">")
    return re.compile(_SLOT.sub(lambda m: f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})", pattern))


def _fill(template: str, slots: dict[str, str]) -> str:
    return _SLOT.sub(lambda m: slots[m.group(1)], template)


# --- tensor conversions: (to ours, from ours); "to ours" checks the shape it reads -----------------


def _need(ok: bool, t: Tensor, what: str) -> None:
    if not ok:
        raise LayoutError(f"expected {what}, got {tuple(t.shape)}")


def _grn_to_ours(t: Tensor) -> Tensor:
    _need(t.ndim in (1, 2, 4) and all(n == 1 for n in t.shape[:-1]), t, "GRN (C,), (1, C) or (1, 1, 1, C)")
    return t.reshape(-1)


def _row_to_ours(t: Tensor) -> Tensor:
    _need(t.ndim == 1 or (t.ndim == 2 and t.shape[0] == 1), t, "bias (C,) or (1, C)")
    return t.reshape(-1)


def _linear_to_ours(t: Tensor) -> Tensor:
    _need(t.ndim == 2 or (t.ndim == 4 and t.shape[2:] == (1, 1)), t, "linear weight (out, in) or (out, in, 1, 1)")
    return t.reshape(t.shape[0], t.shape[1])


def _me_conv_to_ours(t: Tensor) -> Tensor:
    _need(t.ndim == 3, t, "MinkowskiEngine kernel (k*k, in, out)")
    return me_to_conv_weight(t)


def _me_dw_to_ours(t: Tensor) -> Tensor:
    _need(t.ndim == 2, t, "MinkowskiEngine depthwise kernel (k*k, C)")
    return me_to_depthwise_weight(t)


def _same(t: Tensor) -> Tensor:
    return t


KINDS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "same": (_same, _same),
    "grn_1d": (_grn_to_ours, _same),
    "grn_2d": (_grn_to_ours, lambda t: t.reshape(1, -1)),
    "grn_4d": (_grn_to_ours, lambda t: t.reshape(1, 1, 1, -1)),
    "row": (_row_to_ours, lambda t: t.reshape(1, -1)),
    "linear": (_linear_to_ours, _same),
    "conv1x1": (_linear_to_ours, lambda t: t[:, :, None, None]),
    "me_conv": (_me_conv_to_ours, conv_weight_to_me),
    "me_dw": (_me_dw_to_ours, depthwise_weight_to_me),
}


# --- layouts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A named rule table; ``signature`` is a key that only this layout has (None: export only)."""

    name: str
    rules: tuple[Rule, ...]
    signature: str | None
    description: str


def _block(ours: str, theirs: str, names: tuple[str, ...], grn: str, fc: str = "same") -> list[Rule]:
    """Rules of one ConvNeXt V2 block; ``names`` are theirs for conv_dw, norm, fc1, grn w, grn b, fc2."""
    dw, norm, fc1, grn_w, grn_b, fc2 = names
    return [
        Rule(f"{ours}.conv_dw.<p>", f"{theirs}.{dw}.<p>"),
        Rule(f"{ours}.norm.<p>", f"{theirs}.{norm}.<p>"),
        Rule(f"{ours}.mlp.fc1.weight", f"{theirs}.{fc1}.weight", fc),
        Rule(f"{ours}.mlp.fc1.bias", f"{theirs}.{fc1}.bias"),
        Rule(f"{ours}.mlp.grn.weight", f"{theirs}.{grn_w}", grn),
        Rule(f"{ours}.mlp.grn.bias", f"{theirs}.{grn_b}", grn),
        Rule(f"{ours}.mlp.fc2.weight", f"{theirs}.{fc2}.weight", fc),
        Rule(f"{ours}.mlp.fc2.bias", f"{theirs}.{fc2}.bias"),
    ]


_OFFICIAL_BLOCK = ("dwconv", "norm", "pwconv1", "grn.gamma", "grn.beta", "pwconv2")
_OURS_BLOCK = ("conv_dw", "norm", "mlp.fc1", "mlp.grn.weight", "mlp.grn.bias", "mlp.fc2")
_HF_BLOCK = ("dwconv", "layernorm", "pwconv1", "grn.weight", "grn.bias", "pwconv2")


def _ours_rules(prefix: str, fc: str, with_head: bool, with_decoder: bool) -> tuple[Rule, ...]:
    """Our own (= timm's) names, encoder under ``prefix``; ``fc`` is "linear" or timm's "conv1x1"."""
    rules = [
        Rule("stem.<k>.<p>", f"{prefix}stem.<k>.<p>"),
        Rule("stages.<d>.downsample.<k>.<p>", f"{prefix}stages.<d>.downsample.<k>.<p>"),
        *_block("stages.<s>.blocks.<b>", f"{prefix}stages.<s>.blocks.<b>", _OURS_BLOCK, "grn_1d", fc),
    ]
    if with_head:
        rules += [Rule("head.norm.<p>", "head.norm.<p>"), Rule("head.fc.<p>", "head.fc.<p>")]
    if with_decoder:
        rules += _decoder_rules(_OURS_BLOCK, "grn_1d")
    return tuple(rules)


def _decoder_rules(names: tuple[str, ...], grn: str) -> list[Rule]:
    return [
        Rule("proj.<p>", "proj.<p>"),
        Rule("mask_token", "mask_token"),
        *_block("decoder.<j>", "decoder.<j>", names, grn),
        Rule("pred.<p>", "pred.<p>"),
    ]


def _official_dense_rules() -> tuple[Rule, ...]:
    return (
        Rule("stem.<k>.<p>", "downsample_layers.0.<k>.<p>"),
        Rule("stages.<d>.downsample.<k>.<p>", "downsample_layers.<d>.<k>.<p>"),
        *_block("stages.<s>.blocks.<b>", "stages.<s>.<b>", _OFFICIAL_BLOCK, "grn_4d"),
        Rule("head.norm.<p>", "norm.<p>"),
        Rule("head.fc.<p>", "head.<p>"),
    )


def _official_me_rules() -> tuple[Rule, ...]:
    """MinkowskiEngine encoder (``kernel`` tensors, ``.ln``/``.linear`` wrappers) + dense decoder."""
    sparse_block = ("dwconv", "norm.ln", "pwconv1.linear", "grn.gamma", "grn.beta", "pwconv2.linear")
    block = _block("stages.<s>.blocks.<b>", "encoder.stages.<s>.<b>", sparse_block, "grn_2d")
    block[0:1] = [
        Rule("stages.<s>.blocks.<b>.conv_dw.weight", "encoder.stages.<s>.<b>.dwconv.kernel", "me_dw"),
        Rule("stages.<s>.blocks.<b>.conv_dw.bias", "encoder.stages.<s>.<b>.dwconv.bias", "row"),
    ]
    return (
        Rule("stem.<k>.<p>", "encoder.downsample_layers.0.<k>.<p>"),
        Rule("stages.<d>.downsample.0.<p>", "encoder.downsample_layers.<d>.0.ln.<p>"),
        Rule("stages.<d>.downsample.1.weight", "encoder.downsample_layers.<d>.1.kernel", "me_conv"),
        Rule("stages.<d>.downsample.1.bias", "encoder.downsample_layers.<d>.1.bias", "row"),
        *block,
        *_decoder_rules(_OFFICIAL_BLOCK, "grn_4d"),
    )


def _hf_rules(prefix: str) -> tuple[Rule, ...]:
    return (
        Rule("stem.0.<p>", f"{prefix}embeddings.patch_embeddings.<p>"),
        Rule("stem.1.<p>", f"{prefix}embeddings.layernorm.<p>"),
        Rule("stages.<d>.downsample.<k>.<p>", f"{prefix}encoder.stages.<d>.downsampling_layer.<k>.<p>"),
        *_block("stages.<s>.blocks.<b>", f"{prefix}encoder.stages.<s>.layers.<b>", _HF_BLOCK, "grn_4d"),
        Rule("head.norm.<p>", f"{prefix}layernorm.<p>"),
        Rule("head.fc.<p>", "classifier.<p>"),
    )


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("ours", _ours_rules("", "linear", True, False), "stem.0.weight",
           "our / timm ConvNeXt V2: encoder, optional head.norm and head.fc"),
    Layout("ours_fcmae", _ours_rules("encoder.", "linear", False, True), "encoder.stem.0.weight",
           "our FCMAE: encoder.* plus proj, mask_token, decoder.*, pred"),
    Layout("official", _official_dense_rules(), "downsample_layers.0.0.weight",
           "official dense ConvNeXt V2 (*_fcmae.pt encoders, *_ema.pt classifiers)"),
    Layout("official_fcmae", _official_me_rules(), "encoder.downsample_layers.0.0.weight",
           "official PyTorch FCMAE training checkpoint (MinkowskiEngine layout)"),
    Layout("hf", _hf_rules("convnextv2."), "convnextv2.embeddings.patch_embeddings.weight",
           "transformers ConvNextV2ForImageClassification"),
    Layout("hf_base", _hf_rules(""), "embeddings.patch_embeddings.weight", "transformers ConvNextV2Model"),
    Layout("timm_conv_mlp", _ours_rules("", "conv1x1", True, False), None,
           "timm atto..nano (1x1 conv MLP weights); export only, reads as 'ours'"),
)}


def detect_layout(state: dict[str, Tensor]) -> Layout:
    """The layout whose signature key ``state`` holds; LayoutError listing a few keys otherwise."""
    found = [layout for layout in LAYOUTS.values() if layout.signature is not None and layout.signature in state]
    if len(found) != 1:
        sample = ", ".join(sorted(state)[:6])
        raise LayoutError(f"not a known ConvNeXt V2 checkpoint layout (first keys: {sample})")
    return found[0]


def part_of(key: str) -> str:
    """The part (encoder, norm, classifier, decoder) of a canonical key."""
    if key.startswith(("stem.", "stages.")):
        return "encoder"
    if key.startswith("head.norm."):
        return "norm"
    if key.startswith("head.fc."):
        return "classifier"
    if key == "mask_token" or key.startswith(("proj.", "decoder.", "pred.")):
        return "decoder"
    raise KeyError(f"{key!r} is not a canonical ConvNeXt V2 key")


def _translate(state: dict[str, Tensor], rules: tuple[Rule, ...], forward: bool) -> dict[str, Tensor]:
    """Apply ``rules`` theirs -> ours (``forward``) or ours -> theirs; collect every problem, then raise."""
    out: dict[str, Tensor] = {}
    unexpected, misshaped = [], []
    for key, tensor in state.items():
        hits = [(r, m) for r in rules if (m := (r.theirs_regex if forward else r.ours_regex).fullmatch(key))]
        if not hits:
            unexpected.append(key)
            continue
        assert len(hits) == 1, f"layout rules overlap on {key}: {[r.theirs for r, _ in hits]}"
        rule, match = hits[0]
        new_key = _fill(rule.ours if forward else rule.theirs, match.groupdict())
        try:
            out[new_key] = KINDS[rule.kind][0 if forward else 1](tensor)
        except LayoutError as err:
            misshaped.append(f"{key}: {err}")
    if unexpected or misshaped:
        raise LayoutError(describe_key_problems(unexpected=unexpected, misshaped=misshaped))
    return out


def describe_key_problems(**groups: list[str]) -> str:
    lines = []
    for title, keys in groups.items():
        if keys:
            more = f" ... (+{len(keys) - 10})" if len(keys) > 10 else ""
            lines.append(f"  {title.replace('misshaped', 'mis-shaped')} ({len(keys)}): {', '.join(keys[:10])}{more}")
    return "\n".join(lines)


def to_canonical(state: dict[str, Tensor], layout: Layout | str | None = None) -> dict[str, Tensor]:
    """Rename and reshape a state dict of ``layout`` (detected when None) into our canonical layout.

    Raises:
        LayoutError: naming every key no rule accounts for and every tensor of an unexpected shape.
    """
    layout = detect_layout(state) if layout is None else LAYOUTS[layout] if isinstance(layout, str) else layout
    return _translate(state, layout.rules, forward=True)


def from_canonical(canonical: dict[str, Tensor], layout: Layout | str) -> dict[str, Tensor]:
    """Our canonical state dict in another layout; LayoutError for keys that layout has no place for."""
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    return _translate(canonical, layout.rules, forward=False)
