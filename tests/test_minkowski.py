"""MinkowskiEngine backend: parity with ``dense`` and ``native``, and the kernel layout against real ME convs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcmae import random_mask
from models import create_model
from sparse_ops import available_backends, get_backend
from sparse_ops.me_layout import conv_weight_to_me, depthwise_weight_to_me, me_to_conv_weight, me_to_depthwise_weight
from tests.helpers import perturb_parameters, relative_error

pytestmark = pytest.mark.minkowski

TOL = 1e-5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def strict_fp32():
    """No TF32 anywhere, so CUDA parity is held to the fp32 tolerance."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _me():
    from sparse_ops.minkowski import import_minkowski

    return import_minkowski()


def _encoders(name, grn_scope, device, **kw):
    """dense, native and minkowski encoders sharing one perturbed state dict."""
    ref = create_model(name, with_head=False, sparse_backend="dense", grn_scope=grn_scope, **kw)
    perturb_parameters(ref)
    encoders = {"dense": ref}
    for backend in ("native", "minkowski"):
        encoders[backend] = create_model(name, with_head=False, sparse_backend=backend, grn_scope=grn_scope, **kw)
        encoders[backend].load_state_dict(ref.state_dict())
    return {k: v.to(device) for k, v in encoders.items()}


def _run(encoder, imgs, mask, probe):
    """Dense encoder output, and the gradient of a random probe of it, for every parameter."""
    encoder.zero_grad()
    out = encoder.sparse_backend.densify(encoder.forward_masked(imgs, mask))
    (out * probe).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def _assert_parity(name, batch, hw, grn_scope, device, mask=None):
    encoders = _encoders(name, grn_scope, device)
    imgs = torch.randn(batch, 3, *hw, device=device)
    grid = (hw[0] // 32, hw[1] // 32)
    mask = random_mask(batch, grid, 0.6, device=device) if mask is None else mask.to(device)
    probe = torch.randn(batch, encoders["dense"].dims[-1], *grid, device=device)
    results = {k: _run(enc, imgs, mask, probe) for k, enc in encoders.items()}
    out, grads = results["minkowski"]
    assert out.shape == (batch, encoders["dense"].dims[-1], *grid)
    assert (out[mask[:, None].expand_as(out)] == 0).all(), "masked sites must be exact zeros"
    for reference in ("dense", "native"):
        out_ref, grads_ref = results[reference]
        assert relative_error(out, out_ref) < TOL, reference
        for n in grads_ref:
            assert relative_error(grads[n], grads_ref[n]) < TOL, (reference, n)


@pytest.mark.parametrize("grn_scope", ["sample", "batch"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["convnextv2_test", "convnextv2_atto"])
@pytest.mark.parametrize("device", DEVICES)
def test_minkowski_matches_dense_and_native(device, name, batch, grn_scope, strict_fp32):
    _assert_parity(name, batch, (128, 96), grn_scope, device)


@pytest.mark.parametrize("device", DEVICES)
def test_densify_keeps_the_full_grid_when_edges_are_masked(device, strict_fp32):
    """Official issue #79: the dense map's extent must not come from the coordinates present."""
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[0, 0, 0] = False  # sample 0 sees only the top-left patch
    mask[1, 1, 1:3] = False  # sample 1 sees two interior patches; nothing in the last row or column
    _assert_parity("convnextv2_test", 2, (96, 128), "sample", device, mask=mask)


def test_packed_matches_densified_output():
    encoder = create_model("convnextv2_test", with_head=False, sparse_backend="minkowski")
    imgs, mask = torch.randn(3, 3, 96, 64), random_mask(3, (3, 2), 0.5)
    feats = encoder.forward_masked(imgs, mask)
    values, coords = encoder.sparse_backend.packed(feats)
    dense = encoder.sparse_backend.densify(feats)
    assert values.shape == (3 * 3, encoder.dims[-1])
    assert torch.equal(coords[:, 0], coords[:, 0].sort().values)
    assert torch.equal(values, dense.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]])
    assert not mask[coords[:, 0], coords[:, 1], coords[:, 2]].any()


def test_backend_is_listed_and_built_by_name():
    from sparse_ops.minkowski import MinkowskiBackend

    assert "minkowski" in available_backends()
    backend = get_backend("minkowski", grn_scope="batch")
    assert isinstance(backend, MinkowskiBackend) and backend.grn_scope == "batch"
    assert not isinstance(get_backend("auto"), MinkowskiBackend)


def _full_grid(batch, height, width, features, device):
    """Sparse tensor with every site of a (batch, height, width) grid active; ``features`` (B, C, H, W)."""
    coords = torch.ones(batch, height, width, dtype=torch.bool).nonzero().to(device)
    values = features.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]
    return _me().SparseTensor(values.contiguous(), coordinates=coords.int().contiguous())


def _dense_of(tensor, shape):
    return tensor.dense(shape=torch.Size(shape))[0]


@pytest.mark.parametrize("device", DEVICES)
def test_depthwise_kernel_layout_matches_minkowski_on_deltas(device, strict_fp32):
    """A unit impulse at each channel's centre site reads the kernel back in dense layout."""
    channels, side = 5, 11
    me_conv = _me().MinkowskiChannelwiseConvolution(channels, kernel_size=7, bias=False, dimension=2)
    me_conv = me_conv.to(device)
    deltas = torch.zeros(1, channels, side, side, device=device)
    deltas[0, :, side // 2, side // 2] = 1.0
    out = _dense_of(me_conv(_full_grid(1, side, side, deltas, device)), (1, channels, side, side))
    weight = me_to_depthwise_weight(me_conv.kernel.detach())
    expected = F.conv2d(deltas, weight, padding=3, groups=channels)
    assert relative_error(out, expected) < TOL
    # The impulse response is the kernel flipped (cross-correlation): the dense layout is read back.
    centre = out[0, :, side // 2 - 3:side // 2 + 4, side // 2 - 3:side // 2 + 4]
    assert torch.allclose(centre.flip(-1, -2), weight[:, 0], atol=1e-7)
    assert torch.equal(depthwise_weight_to_me(weight), me_conv.kernel.detach())


@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # inside ME 0.5.4
@pytest.mark.parametrize("device", DEVICES)
def test_strided_kernel_layout_matches_minkowski_on_deltas(device, strict_fp32):
    """One impulse per 2x2 window position picks out one kernel slice of the stride-2 conv."""
    cin, cout = 3, 4
    me_conv = _me().MinkowskiConvolution(cin, cout, kernel_size=2, stride=2, bias=False, dimension=2).to(device)
    weight = me_to_conv_weight(me_conv.kernel.detach())
    deltas = torch.zeros(4, cin, 4, 6, device=device)
    for b, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        deltas[b, b % cin, 2 + dy, 2 + dx] = 1.0
    out = _dense_of(me_conv(_full_grid(4, 4, 6, deltas, device)), (4, cout, 2, 3))
    assert relative_error(out, F.conv2d(deltas, weight, stride=2)) < TOL
    for b, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        assert torch.allclose(out[b, :, 1, 1], weight[:, b % cin, dy, dx], atol=1e-7)
    assert torch.equal(conv_weight_to_me(weight), me_conv.kernel.detach())
