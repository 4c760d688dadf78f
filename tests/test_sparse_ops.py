"""Backends: dense masked emulation vs token-sparse native, and the backend contract."""

from __future__ import annotations

import copy

import pytest
import torch

from fcmae import random_mask
from models import create_model
from sparse_ops import DenseMaskedBackend, NativeSparseBackend, get_backend
from sparse_ops.native import morton_offsets
from tests.helpers import perturb_parameters, relative_error

TOL = 1e-5


def _encoder(name: str, backend: str, grn_scope: str = "sample", **kw):
    return create_model(name, with_head=False, sparse_backend=backend, grn_scope=grn_scope, **kw)


def _run(encoder, imgs, mask, probe):
    """Dense encoder output, and the gradient of a random probe of it, for every parameter."""
    encoder.zero_grad()
    out = encoder.sparse_backend.densify(encoder.forward_masked(imgs, mask))
    (out * probe).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def _compare_backends(name, backend, batch, hw, ratio, grn_scope, reference="dense", **kw):
    ref = _encoder(name, reference, grn_scope, **kw)
    perturb_parameters(ref)
    other = _encoder(name, backend, grn_scope, **kw)
    other.load_state_dict(ref.state_dict())
    imgs = torch.randn(batch, 3, *hw)
    mask = random_mask(batch, (hw[0] // 32, hw[1] // 32), ratio)
    probe = torch.randn(batch, ref.dims[-1], hw[0] // 32, hw[1] // 32)
    out_ref, grads_ref = _run(ref, imgs, mask, probe)
    out, grads = _run(other, imgs, mask, probe)
    assert (out[mask[:, None].expand_as(out)] == 0).all(), "masked sites must be exact zeros"
    assert relative_error(out, out_ref) < TOL
    for n in grads_ref:
        assert relative_error(grads[n], grads_ref[n]) < TOL, n


@pytest.mark.parametrize("grn_scope", ["sample", "batch"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.9])
@pytest.mark.parametrize("name", ["convnextv2_test", "convnextv2_atto"])
def test_native_matches_dense(name, ratio, batch, grn_scope):
    _compare_backends(name, "native", batch, (128, 128), ratio, grn_scope)


@pytest.mark.parametrize("grn_scope", ["sample", "batch"])
def test_native_matches_dense_non_square(grn_scope):
    _compare_backends("convnextv2_atto", "native", 2, (96, 224), 0.6, grn_scope)


def test_native_matches_dense_with_uneven_user_mask():
    """Samples with different visible counts take the segment-reduction path."""
    ref = _encoder("convnextv2_test", "dense")
    perturb_parameters(ref)
    other = _encoder("convnextv2_test", "native")
    other.load_state_dict(ref.state_dict())
    imgs = torch.randn(3, 3, 96, 96)
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, 1, 1] = True
    mask[2] = True  # a fully masked sample
    probe = torch.randn(3, ref.dims[-1], 3, 3)
    out_ref, grads_ref = _run(ref, imgs, mask, probe)
    out, grads = _run(other, imgs, mask, probe)
    assert relative_error(out, out_ref) < TOL
    for n in grads_ref:
        assert relative_error(grads[n], grads_ref[n]) < TOL, n


@pytest.mark.parametrize("backend", ["native", pytest.param("minkowski", marks=pytest.mark.minkowski)])
def test_drop_path_agrees_across_backends(backend):
    ref = _encoder("convnextv2_test", "dense", drop_path_rate=0.5).train()
    other = _encoder("convnextv2_test", backend, drop_path_rate=0.5).train()
    other.load_state_dict(ref.state_dict())
    imgs, mask = torch.randn(4, 3, 64, 64), random_mask(4, (2, 2), 0.5)
    other.forward_masked(imgs, mask)  # a backend's first call may draw random numbers (MinkowskiEngine's setup)
    torch.manual_seed(3)
    out_ref = ref.sparse_backend.densify(ref.forward_masked(imgs, mask))
    torch.manual_seed(3)
    out = other.sparse_backend.densify(other.forward_masked(imgs, mask))
    assert relative_error(out, out_ref) < TOL


@pytest.mark.parametrize("backend", ["dense", "native"])
def test_mask_ratio_zero_equals_plain_dense_model(backend):
    encoder = _encoder("convnextv2_atto", backend)
    perturb_parameters(encoder)
    imgs = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    out = encoder.sparse_backend.densify(encoder.forward_masked(imgs, mask))
    assert relative_error(out, encoder.forward_features(imgs)) < TOL


@pytest.mark.parametrize("backend", ["dense", "native"])
def test_masked_pixels_never_reach_visible_outputs(backend):
    encoder = _encoder("convnextv2_test", backend)
    perturb_parameters(encoder)
    imgs = torch.randn(2, 3, 128, 128)
    mask = random_mask(2, (4, 4), 0.6)
    noisy = imgs + 10 * torch.randn_like(imgs) * mask.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None]
    out = encoder.sparse_backend.densify(encoder.forward_masked(imgs, mask))
    out_noisy = encoder.sparse_backend.densify(encoder.forward_masked(noisy, mask))
    assert torch.equal(out, out_noisy)


def test_packed_features_match_dense_output():
    encoder = _encoder("convnextv2_test", "native")
    imgs, mask = torch.randn(2, 3, 96, 64), random_mask(2, (3, 2), 0.5)
    feats = encoder.forward_masked(imgs, mask)
    values, coords = encoder.sparse_backend.packed(feats)
    dense = encoder.sparse_backend.densify(feats)
    assert values.shape == (2 * 3, encoder.dims[-1])
    assert torch.equal(values, dense.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]])
    assert not mask[coords[:, 0], coords[:, 1], coords[:, 2]].any()


def test_state_dict_is_shared_by_backends():
    a = _encoder("convnextv2_test", "dense").state_dict()
    b = _encoder("convnextv2_test", "native").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert {k: v.shape for k, v in a.items()} == {
        k: v.shape for k, v in create_model("convnextv2_test", with_head=False).state_dict().items()
    }


def test_backend_resolution():
    assert isinstance(get_backend("auto"), NativeSparseBackend)
    assert isinstance(get_backend("dense", "batch"), DenseMaskedBackend)
    assert get_backend("dense", "batch").grn_scope == "batch"
    backend = get_backend("native")
    assert get_backend(backend) is backend
    with pytest.raises(ValueError, match="unknown sparse backend 'sparse'"):
        get_backend("sparse")
    with pytest.raises(ValueError, match="grn_scope"):
        get_backend("native", grn_scope="channel")


def test_missing_minkowski_raises_with_install_hint(monkeypatch):
    import sparse_ops

    monkeypatch.setattr(sparse_ops, "minkowski_available", lambda: False)
    with pytest.raises(ImportError, match="install_minkowski"):
        get_backend("minkowski")


def test_grn_scopes_differ():
    """The two scopes are different functions (so the parity tests above test something)."""
    sample = _encoder("convnextv2_test", "native", "sample")
    perturb_parameters(sample)
    batch = copy.deepcopy(sample)
    batch.sparse_backend = get_backend("native", "batch")
    imgs, mask = torch.randn(3, 3, 64, 64), random_mask(3, (2, 2), 0.5)
    a = sample.sparse_backend.densify(sample.forward_masked(imgs, mask))
    b = batch.sparse_backend.densify(batch.forward_masked(imgs, mask))
    assert relative_error(a, b) > 1e-3


def test_morton_order_groups_2x2_windows():
    offsets = [tuple(o) for o in morton_offsets(8).tolist()]
    assert len(set(offsets)) == 64
    for g in range(16):
        window = tuple(offsets[4 * g:4 * g + 4])
        y0, x0 = window[0]
        assert window == ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1))
        assert [y0 // 2, x0 // 2] == morton_offsets(4)[g].tolist()


def test_site_tables_compile_with_dynamic_shapes():
    """The visible patches, site indices and neighbour table trace into a compiled step (no graph break on
    CUDA) and stay exact when batch and grid sizes change."""
    from sparse_ops import native
    from sparse_ops.sparse_dwconv import neighbour_table

    def tables(mask, visible, side, shape):
        patches, _ = native._visible_patches(mask, visible)
        flat, batch_index = native._site_indices(patches, side, shape[1], shape[2])
        return flat, batch_index, neighbour_table(flat, shape, 7)

    compiled = torch.compile(tables, dynamic=True, fullgraph=True)
    for b, gh, gw in ((2, 2, 2), (3, 2, 3)):
        mask = random_mask(b, (gh, gw), 0.5)
        for side in (8, 2):
            args = (mask, gh * gw // 2, side, (b, gh * side, gw * side))
            for got, want in zip(compiled(*args), tables(*args), strict=True):
                assert torch.equal(got, want)
