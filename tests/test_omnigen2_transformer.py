"""OmniGen2's transformer at a tiny size on the CPU: shapes for even and odd latents, the text mask (padding has no
effect, content under an unmasked token does), reference latents, gradient checkpointing, the key names ComfyUI's
model uses. Agreement with ComfyUI's own model: tests/integration/test_comfyui_omnigen2_model.py."""

from __future__ import annotations

import pytest
import torch

from trainer.models.omnigen2_transformer import OmniGen2Transformer

CONFIG = dict(hidden_size=96, num_layers=2, num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2,
              multiple_of=32, axes_dim_rope=(8, 8, 8), text_feat_dim=32)


@pytest.fixture(scope="module")
def model() -> OmniGen2Transformer:
    torch.manual_seed(0)
    m = OmniGen2Transformer(**CONFIG).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
    return m


def _inputs(b: int = 1, h: int = 8, w: int = 6, n: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, n, 32, generator=g)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) > 1e-4 * float(b.abs().max())


@pytest.mark.parametrize("h,w", [(8, 6), (7, 5), (5, 8)])
def test_output_shape_even_and_odd(model: OmniGen2Transformer, h: int, w: int) -> None:
    x, t, ctx = _inputs(b=2, h=h, w=w)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_masked_tokens_have_no_effect(model: OmniGen2Transformer) -> None:
    x, t, ctx = _inputs(n=9)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0]])
    other = ctx.clone()
    other[:, 5:] = torch.randn(1, 4, 32)
    with torch.no_grad():
        padded = model(x, t, ctx, attention_mask=mask)
        padded_other = model(x, t, other, attention_mask=mask)
        unpadded = model(x, t, ctx[:, :5])
        unmasked = model(x, t, ctx)
        unmasked_other = model(x, t, other)
    torch.testing.assert_close(padded_other, padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)  # padding is as if it were not there
    assert _differs(unmasked, padded)
    assert _differs(unmasked_other, unmasked)  # the same tokens unmasked do change the output


def test_all_ones_mask_is_no_mask_and_batch_rows_are_independent(model: OmniGen2Transformer) -> None:
    x, t, ctx = _inputs(b=2, n=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, attention_mask=torch.ones(2, 6)), model(x, t, ctx))
        batched = model(x, t, ctx, attention_mask=mask)
        first = model(x[:1], t[:1], ctx[:1])
        second = model(x[1:], t[1:], ctx[1:, :3])
    torch.testing.assert_close(batched[:1], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1:], second, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmasked"):
        model(x, t, ctx, attention_mask=torch.tensor([[1] * 6, [0] * 6]))


def test_ref_latents_change_the_output(model: OmniGen2Transformer) -> None:
    x, t, ctx = _inputs(b=2)
    g = torch.Generator().manual_seed(3)
    ref, ref2 = torch.randn(1, 16, 5, 4, generator=g), torch.randn(1, 16, 6, 6, generator=g)
    with torch.no_grad():
        plain = model(x, t, ctx)
        with_ref = model(x, t, ctx, ref_latents=[ref])
        with_other_ref = model(x, t, ctx, ref_latents=[ref2])
        both = model(x, t, ctx, ref_latents=[ref, ref2])
        swapped = model(x, t, ctx, ref_latents=[ref2, ref])
        per_sample = model(x, t, ctx, ref_latents=[ref.expand(2, -1, -1, -1)])
    assert with_ref.shape == x.shape
    assert _differs(with_ref, plain) and _differs(with_other_ref, with_ref)
    assert _differs(swapped, both)  # the order (index embedding, rope shift) matters
    torch.testing.assert_close(per_sample, with_ref)  # a batch-1 reference serves every sample
    with pytest.raises(ValueError, match="index embeddings"):
        model(x, t, ctx, ref_latents=[ref] * 6)


def test_timestep_matters_and_may_be_a_scalar(model: OmniGen2Transformer) -> None:
    x, _, ctx = _inputs()
    with torch.no_grad():
        a = model(x, torch.tensor([0.2]), ctx)
        b = model(x, torch.tensor([0.8]), ctx)
        scalar = model(x, torch.tensor(0.2), ctx)
    assert _differs(a, b)
    torch.testing.assert_close(scalar, a)


def test_gradient_checkpointing_same_output_and_grads(model: OmniGen2Transformer) -> None:
    x, t, ctx = _inputs()
    ref = torch.randn(1, 16, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(x, t, ctx, attention_mask=mask, ref_latents=[ref])
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        plain_out, plain_grads = run()
        model.enable_gradient_checkpointing()
        assert model.gradient_checkpointing
        ckpt_out, ckpt_grads = run()
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert not model.gradient_checkpointing
    torch.testing.assert_close(ckpt_out, plain_out)
    assert set(ckpt_grads) == set(plain_grads)
    assert any(n.startswith("layers.") for n in plain_grads)
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], rtol=1e-5, atol=1e-7)


def test_checkpointing_recomputes_the_main_layers(model: OmniGen2Transformer) -> None:
    # the main layers' attention runs once more in the backward pass when checkpointed: proof the flag is honored
    # (hooked below the layer: non-reentrant recomputation stops once it has what backward needs)
    calls = []
    hook = model.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
    x, t, ctx = _inputs()
    try:
        model.train()
        model.enable_gradient_checkpointing()
        model(x, t, ctx).sum().backward()
    finally:
        hook.remove()
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert len(calls) == 2


BLOCK_KEYS = ["attn.norm_k.weight", "attn.norm_q.weight", "attn.to_k.weight", "attn.to_out.0.weight",
              "attn.to_q.weight", "attn.to_v.weight", "feed_forward.linear_1.weight", "feed_forward.linear_2.weight",
              "feed_forward.linear_3.weight", "ffn_norm1.weight", "ffn_norm2.weight", "norm1.linear.bias",
              "norm1.linear.weight", "norm1.norm.weight", "norm2.weight"]
CONTEXT_BLOCK_KEYS = sorted([k for k in BLOCK_KEYS if not k.startswith("norm1.")] + ["norm1.weight"])


def test_state_dict_keys_are_comfyuis(model: OmniGen2Transformer) -> None:
    expected = {"image_index_embedding", "ref_image_patch_embedder.bias", "ref_image_patch_embedder.weight",
                "x_embedder.bias", "x_embedder.weight", "norm_out.linear_1.bias", "norm_out.linear_1.weight",
                "norm_out.linear_2.bias", "norm_out.linear_2.weight", "time_caption_embed.caption_embedder.0.weight",
                "time_caption_embed.caption_embedder.1.bias", "time_caption_embed.caption_embedder.1.weight",
                "time_caption_embed.timestep_embedder.linear_1.bias",
                "time_caption_embed.timestep_embedder.linear_1.weight",
                "time_caption_embed.timestep_embedder.linear_2.bias",
                "time_caption_embed.timestep_embedder.linear_2.weight"}
    expected |= {f"layers.{i}.{k}" for i in range(2) for k in BLOCK_KEYS}
    expected |= {f"{r}.0.{k}" for r in ("noise_refiner", "ref_image_refiner") for k in BLOCK_KEYS}
    expected |= {f"context_refiner.0.{k}" for k in CONTEXT_BLOCK_KEYS}
    sd = model.state_dict()
    assert set(sd) == expected
    assert {k.split(".")[0] for k in sd} == {
        "context_refiner", "image_index_embedding", "layers", "noise_refiner", "norm_out", "ref_image_patch_embedder",
        "ref_image_refiner", "time_caption_embed", "x_embedder"}
    # widths: FFN 4 * 96 = 384 (a multiple of 32), KV heads 2 x head dim 24, time embedding min(hidden, 1024)
    assert sd["layers.0.feed_forward.linear_1.weight"].shape == (384, 96)
    assert sd["layers.0.attn.to_k.weight"].shape == (48, 96)
    assert sd["layers.0.norm1.linear.weight"].shape == (384, 96)
    assert sd["image_index_embedding"].shape == (5, 96)
    assert sd["x_embedder.weight"].shape == (96, 64)


def test_full_size_config_is_comfyuis() -> None:
    # the released model as ComfyUI's model_detection fixes it, built without weights
    with torch.device("meta"):
        full = OmniGen2Transformer()
    sd = full.state_dict()
    assert sum(1 for k in sd if k.startswith("layers.") and k.endswith("attn.to_q.weight")) == 32
    assert sd["layers.0.attn.to_q.weight"].shape == (2520, 2520)
    assert sd["layers.0.attn.to_k.weight"].shape == (840, 2520)  # 7 KV heads x 120
    assert sd["layers.0.feed_forward.linear_1.weight"].shape == (10240, 2520)  # 4 * 2520 rounded up to 256
    assert sd["time_caption_embed.caption_embedder.1.weight"].shape == (2520, 2048)
    assert sd["layers.0.norm1.linear.weight"].shape == (4 * 2520, 1024)
    assert sd["norm_out.linear_2.weight"].shape == (64, 2520)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="head dim"):
        OmniGen2Transformer(**{**CONFIG, "axes_dim_rope": (8, 8, 6)})
    with pytest.raises(ValueError, match="KV head"):
        OmniGen2Transformer(**{**CONFIG, "num_kv_heads": 3})


def test_save_and_load_pretrained_round_trip(model: OmniGen2Transformer, tmp_path) -> None:
    model.save_pretrained(tmp_path)
    loaded = OmniGen2Transformer.from_pretrained(tmp_path).eval()
    assert loaded.config.axes_dim_rope == list(CONFIG["axes_dim_rope"])
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx), model(x, t, ctx), rtol=0, atol=0)
