"""FCMAE: loss definition, shapes, gradients, geometry and errors."""

from __future__ import annotations

import pytest
import torch

import fcmae
from fcmae import create_fcmae, patchify, random_mask, unpatchify
from tests.helpers import relative_error


def _direct_loss(imgs, pred, mask_bl, norm_pix):
    """The loss written out patch by patch; ``pred`` holds the masked patches in row-major mask order."""
    b, c, h, w = imgs.shape
    total, count = 0.0, 0
    for i in range(b):
        for k in range(mask_bl.shape[1]):
            if not mask_bl[i, k]:
                continue
            r, q = divmod(k, w // 32)
            patch = imgs[i, :, r * 32:(r + 1) * 32, q * 32:(q + 1) * 32].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
            total += ((pred[count] - patch) ** 2).mean()
            count += 1
    assert count == len(pred)
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_direct_formula(norm_pix):
    model = create_fcmae("convnextv2_test", norm_pix_loss=norm_pix, decoder_embed_dim=16)
    imgs = torch.randn(2, 3, 64, 96)
    out = model(imgs)
    expected = _direct_loss(imgs, out.pred, out.mask, norm_pix)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_ignores_targets_of_visible_patches():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, (2, 2), 0.5)
    changed = imgs + 5 * (~mask).repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None]
    rows, other_rows = fcmae.masked_rows(mask.flatten(1)), fcmae.masked_rows(~mask.flatten(1))
    pred = torch.randn(len(rows), 32 * 32 * 3)
    assert model.forward_loss(imgs, pred, rows) == model.forward_loss(changed, pred, rows)
    assert model.forward_loss(imgs, pred, rows) != model.forward_loss(imgs, pred, other_rows)


def test_masked_rows_with_and_without_count_promise():
    mask = random_mask(5, (3, 4), 0.6, generator=torch.Generator().manual_seed(3)).flatten(1)
    expected = mask.flatten().nonzero().squeeze(1)
    assert torch.equal(fcmae.masked_rows(mask, int(mask[0].sum())), expected)
    assert torch.equal(fcmae.masked_rows(mask), expected)


def test_predictions_of_masked_patches_equal_the_full_decoder():
    """The decoder's tail runs at masked patches only; it must equal the whole decoder read there."""
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16, decoder_depth=2)
    imgs, mask = torch.randn(2, 3, 64, 96), random_mask(2, (2, 3), 0.5)
    out = model(imgs, mask)
    latent = model.encode(imgs, mask)
    every = model.forward_decoder(latent, mask, torch.arange(2 * 6))  # (B*L, D)
    assert out.pred.shape == (6, 3072)
    assert relative_error(out.pred, every[mask.flatten()]) < 1e-6
    decoder_input = model.decoder[0](torch.randn(2, 16, 2, 3))
    rows = torch.tensor([0, 4, 5, 11])
    dense = model.decoder[1](decoder_input).permute(0, 2, 3, 1).flatten(0, 2)[rows]
    assert relative_error(model.decoder[1].forward_rows(decoder_input, rows), dense) < 1e-6


def test_no_decoder_blocks_predicts_from_the_mask_token():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16, decoder_depth=0)
    out = model(torch.randn(2, 3, 64, 64), random_mask(2, (2, 2), 0.5))
    token = torch.nn.functional.linear(model.mask_token.flatten(), model.pred.weight.flatten(1), model.pred.bias)
    assert relative_error(out.pred, token.expand_as(out.pred)) < 1e-6


def test_patchify_order_and_roundtrip():
    imgs = torch.randn(2, 4, 64, 96)
    patches = patchify(imgs, 32)
    assert patches.shape == (2, 6, 32 * 32 * 4)
    # patch 4 is row 1, col 1; value index (p, q, c) = (2, 5, 3)
    assert patches[1, 4, (2 * 32 + 5) * 4 + 3] == imgs[1, 3, 32 + 2, 32 + 5]
    assert torch.equal(unpatchify(patches, 32, (2, 3), 4), imgs)


def test_output_shapes_and_mask_convention():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    out = model(torch.randn(3, 3, 96, 64))
    loss, pred, mask = out  # tuple-unpackable like the official model
    assert loss.dim() == 0 and pred.shape == (3 * 4, 3072)  # masked patches only
    assert mask.shape == (3, 6) and mask.dtype == torch.bool
    assert (mask.sum(1) == 6 - int(6 * 0.4)).all()


@pytest.mark.parametrize("backend", ["dense", "native"])
def test_every_parameter_gets_a_gradient(backend):
    model = create_fcmae("convnextv2_test", backend=backend, decoder_embed_dim=16, decoder_depth=2)
    model(torch.randn(2, 3, 64, 64)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        if backend == "native":  # DDP's buckets expect gradient strides equal to the parameter's
            assert p.grad.stride() == p.stride(), name


def test_batch_size_one_and_generator_reproducibility():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    imgs = torch.randn(1, 3, 64, 64)
    a = model(imgs, generator=torch.Generator().manual_seed(0))
    b = model(imgs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.mask, b.mask) and a.loss == b.loss


@pytest.mark.parametrize("in_chans", [1, 4])
def test_other_channel_counts(in_chans):
    model = create_fcmae("convnextv2_test", in_chans=in_chans, decoder_embed_dim=16)
    out = model(torch.randn(2, in_chans, 64, 64))
    assert out.pred.shape == (2 * 3, 32 * 32 * in_chans) and torch.isfinite(out.loss)


def test_user_mask_is_used():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    mask = torch.tensor([[1, 0, 1, 1]])
    out = model(torch.randn(1, 3, 64, 64), mask=mask)
    assert out.mask.tolist() == [[True, False, True, True]]


def test_encoder_features_for_custom_experiments():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    imgs, mask = torch.randn(2, 3, 64, 96), random_mask(2, (2, 3), 0.5)
    dense = model.encode(imgs, mask)
    values, coords = model.encode_packed(imgs, mask)
    assert dense.shape == (2, 32, 2, 3)
    assert (dense.permute(0, 2, 3, 1)[mask] == 0).all()
    assert relative_error(values, dense.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]) == 0


def test_backends_give_the_same_loss_and_gradients():
    torch.manual_seed(1)
    dense = create_fcmae("convnextv2_atto", backend="dense")
    native = create_fcmae("convnextv2_atto", backend="native")
    native.load_state_dict(dense.state_dict())
    imgs, mask = torch.randn(2, 3, 128, 96), random_mask(2, (4, 3), 0.6)
    a, b = dense(imgs, mask), native(imgs, mask)
    a.loss.backward()
    b.loss.backward()
    assert relative_error(b.loss, a.loss) < 1e-5
    for (name, p), q in zip(dense.named_parameters(), native.parameters(), strict=True):
        assert relative_error(q.grad, p.grad) < 1e-5, name


def test_random_mask_path_matches_across_backends():
    """FCMAE's own masks pass a visible-count promise to the backend; results must not change."""
    dense = create_fcmae("convnextv2_test", backend="dense", decoder_embed_dim=16)
    native = create_fcmae("convnextv2_test", backend="native", decoder_embed_dim=16)
    native.load_state_dict(dense.state_dict())
    imgs = torch.randn(3, 3, 96, 64)
    a = dense(imgs, generator=torch.Generator().manual_seed(4))
    b = native(imgs, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask)
    assert relative_error(b.pred, a.pred) < 1e-5


def test_compiled_native_training_step_follows_shape_changes():
    """torch.compile (the pretraining ``train.compile`` option) on the default backend, two input shapes."""
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    compiled = torch.compile(model)
    for shape in [(2, 3, 64, 64), (3, 3, 64, 96)]:
        imgs, mask = torch.randn(*shape), random_mask(shape[0], (shape[2] // 32, shape[3] // 32), 0.5)
        out = compiled(imgs, mask)
        out.loss.backward()
        assert relative_error(out.loss, model(imgs, mask).loss) < 1e-5


def test_initialisation():
    model = create_fcmae("convnextv2_tiny")
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.pred.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not model.decoder[0].mlp.grn.weight.any()


def test_configuration_errors():
    with pytest.raises(ValueError, match="mask_ratio"):
        create_fcmae("convnextv2_test", mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown sparse backend"):
        create_fcmae("convnextv2_test", backend="spconv")
    with pytest.raises(ValueError, match="unknown model"):
        create_fcmae("convnext_tiny")
    with pytest.raises(ValueError, match="total stride"):
        fcmae.FCMAE(fcmae.create_fcmae("convnextv2_test").encoder, patch_size=16)
    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 64, 80))


def test_pretrained_roundtrip(tmp_path):
    from safetensors.torch import save_file

    model = create_fcmae("convnextv2_test", decoder_embed_dim=16)
    save_file(model.state_dict(), tmp_path / "full.safetensors")
    save_file(model.encoder.state_dict(), tmp_path / "encoder.safetensors")
    full = create_fcmae("convnextv2_test", decoder_embed_dim=16, pretrained=tmp_path / "full.safetensors")
    enc = create_fcmae("convnextv2_test", decoder_embed_dim=16, pretrained=tmp_path / "encoder.safetensors")
    assert torch.equal(full.mask_token, model.mask_token)
    assert torch.equal(enc.encoder.stem[0].weight, model.encoder.stem[0].weight)
    assert not torch.equal(enc.mask_token, model.mask_token)
    with pytest.raises(ValueError, match="mis-shaped"):
        create_fcmae("convnextv2_atto", decoder_embed_dim=16, pretrained=tmp_path / "encoder.safetensors")
