"""OmniGen2's diffusion transformer, with ComfyUI's module names and ComfyUI's forward convention.

Module and parameter names are those of ComfyUI's `comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel`, so a
ComfyUI (or original OmniGen2) transformer state dict loads with `strict=True` and a LoRA key
`diffusion_model.<module name>` lands on the same module in ComfyUI. The defaults are the released model, as
ComfyUI's model_detection.py fixes it: hidden 2520, 21 heads over 7 KV heads (head dim 120 = rope axes 40+40+40),
32 main layers, 2 layers in each refiner, patch 2, 16 latent channels, Qwen2.5-VL-3B text features (2048).

forward(x, timesteps, context, attention_mask=None, ref_latents=None):

* x: (b, 16, h, w) noisy latent, already in the model's latent space (ComfyUI's Flux latent format: the VAE latent
  after (z - 0.0609) * 1.5305). h and w need not be even: the latent is padded circularly to the patch size and the
  output cropped back, as ComfyUI does.
* timesteps: (b,) the flow-matching sigma, 1 = pure noise, 0 = clean, where x = (1 - sigma) * x0 + sigma * noise.
  This is what ComfyUI's model_base passes to the diffusion model (the model type is FLOW with multiplier 1.0, so
  `model_sampling.timestep(sigma) == sigma`). Internally the model runs on OmniGen2's own time, t = 1 - sigma
  (0 = noise, 1 = data), embedded sinusoidally at timestep_scale (1000) times t.
* context: (b, n, 2048) text encoder hidden states.
* attention_mask: optional (b, n) text mask, 1 = token, 0 = padding. Padding tokens have no effect at all: the
  output equals ComfyUI's for the same caption without its padding (ComfyUI never pads OmniGen2 captions: each prompt
  is encoded at its own length, its mask is all ones and model_base drops it). An all-ones mask is the same as None.
* ref_latents: optional list (at most max_ref_images) of reference latents, each (b or 1, 16, hr, wr), any size;
  they are patch-embedded by their own embedder, tagged with image_index_embedding[j], refined, and put in the joint
  sequence before the noisy image.

Output: (b, 16, h, w) flow velocity noise - x0, i.e. the negation of what OmniGen2 itself predicts (x0 - noise in
its own time direction); ComfyUI's FLOW sampling then takes denoised = x - sigma * output.

Rope positions (3 axes) in the joint sequence [text, ref_1, ..., ref_k, image]: text token j is at (j, j, j);
reference j is at (s_j, row, col) with s_1 = number of text tokens and s_{j+1} = s_j + max(rows_j, cols_j); the noisy
image is at (s_{k+1}, row, col). Each refiner runs on its own segment with that segment's positions; the main layers
attend over the whole sequence.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


def _checkpoint(module: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def _rope_cos_sin(position_ids: torch.Tensor, axes_dim: Sequence[int],
                  theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, L, 3) integer positions -> cos, sin of shape (b, L, 1, head_dim / 2), one frequency band per axis."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        # frequencies in float64 like ComfyUI's flux rope, so the angles of large positions stay exact
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=position_ids.device) / dim))
        angles.append(position_ids[..., axis].to(torch.float64)[..., None] * inv_freq)
    angle = torch.cat(angles, dim=-1)[:, :, None, :]
    return angle.cos().float(), angle.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive channel pairs (x[2i], x[2i+1]) of (b, L, heads, head_dim) by the given angles."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(b, c, h*p, w*p) -> (b, h*w, p*p*c), channels fastest, as ComfyUI's 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'."""
    b, c, hp, wp = x.shape
    x = x.reshape(b, c, hp // p, p, wp // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (hp // p) * (wp // p), p * p * c)


def _unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(b, h*w, p*p*c) -> (b, c, h*p, w*p), the inverse of _patchify."""
    b, _, d = x.shape
    c = d // (p * p)
    x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * p, w * p)


def _pad_to_patch(x: torch.Tensor, p: int) -> torch.Tensor:
    """Circular padding at the bottom/right up to a multiple of p (ComfyUI's pad_to_patch_size)."""
    pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="circular")


def _grid_ids(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return r, c


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class Lumina2CombinedTimestepCaptionEmbedding(nn.Module):
    """Sinusoidal time embedding (cos first, no frequency shift) through an MLP, and the caption projection."""

    def __init__(self, hidden_size: int, text_feat_dim: int, frequency_embedding_size: int, norm_eps: float,
                 timestep_scale: float) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.timestep_scale = timestep_scale
        self.timestep_embedder = TimestepEmbedding(frequency_embedding_size, min(hidden_size, 1024))
        self.caption_embedder = nn.Sequential(nn.RMSNorm(text_feat_dim, eps=norm_eps),
                                              nn.Linear(text_feat_dim, hidden_size, bias=True))

    def time_proj(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = self.timestep_scale * (t[:, None].float() * freqs[None])
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, text: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.timestep_embedder(self.time_proj(t).to(dtype)), self.caption_embedder(text)


class Attention(nn.Module):
    """Grouped-query self-attention with per-head RMSNorm on q and k and rope."""

    def __init__(self, dim: int, heads: int, kv_heads: int, qk_norm_eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, heads * self.dim_head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * self.dim_head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * self.dim_head, bias=False)
        self.norm_q = nn.RMSNorm(self.dim_head, eps=qk_norm_eps)
        self.norm_k = nn.RMSNorm(self.dim_head, eps=qk_norm_eps)
        # a Sequential so the projection is `to_out.0`, the name in the released weights
        self.to_out = nn.Sequential(nn.Linear(heads * self.dim_head, dim, bias=False), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, n, self.heads, self.dim_head))
        k = self.norm_k(self.to_k(x).view(b, n, self.kv_heads, self.dim_head))
        v = self.to_v(x).view(b, n, self.kv_heads, self.dim_head)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_heads < self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class LuminaFeedForward(nn.Module):
    """SwiGLU: linear_2(silu(linear_1 x) * linear_3 x)."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner_dim, bias=False)
        self.linear_2 = nn.Linear(inner_dim, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)) * self.linear_3(x))


class LuminaRMSNormZero(nn.Module):
    """RMSNorm scaled by (1 + scale) from the time embedding; also returns the attention gate and the MLP scale/gate."""

    def __init__(self, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(min(dim, 1024), 4 * dim)
        self.norm = nn.RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(self.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class OmniGen2TransformerBlock(nn.Module):
    """Pre- and post-normed attention and SwiGLU; with `modulation` both are scaled and tanh-gated by the time."""

    def __init__(self, dim: int, heads: int, kv_heads: int, ffn_inner_dim: int, norm_eps: float, qk_norm_eps: float,
                 modulation: bool) -> None:
        super().__init__()
        self.modulation = modulation
        self.attn = Attention(dim, heads, kv_heads, qk_norm_eps)
        self.feed_forward = LuminaFeedForward(dim, ffn_inner_dim)
        self.norm1 = LuminaRMSNormZero(dim, norm_eps) if modulation else nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.modulation:
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
            x = x + gate_msa[:, None].tanh() * self.norm2(self.attn(h, key_mask, cos, sin))
            mlp = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
            return x + gate_mlp[:, None].tanh() * self.ffn_norm2(mlp)
        x = x + self.norm2(self.attn(self.norm1(x), key_mask, cos, sin))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class LuminaLayerNormContinuous(nn.Module):
    """Final LayerNorm (no affine) scaled by (1 + linear_1(silu(temb))), then the projection to patch pixels."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear_1 = nn.Linear(cond_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        emb = self.linear_1(self.silu(temb).to(x.dtype))
        return self.linear_2(self.norm(x) * (1 + emb)[:, None, :])


class OmniGen2Transformer(ModelMixin, ConfigMixin):
    """OmniGen2's transformer; see the module docstring for the forward convention."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["OmniGen2TransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: Optional[int] = None,
        hidden_size: int = 2520,
        num_layers: int = 32,
        num_refiner_layers: int = 2,
        num_attention_heads: int = 21,
        num_kv_heads: int = 7,
        multiple_of: int = 256,
        ffn_dim_multiplier: Optional[float] = None,
        norm_eps: float = 1e-5,
        qk_norm_eps: float = 1e-5,
        final_norm_eps: float = 1e-6,
        axes_dim_rope: tuple[int, int, int] = (40, 40, 40),
        axes_lens: tuple[int, int, int] = (1024, 1664, 1664),
        rope_theta: float = 10000.0,
        text_feat_dim: int = 2048,
        timestep_scale: float = 1000.0,
        frequency_embedding_size: int = 256,
        max_ref_images: int = 5,
    ) -> None:
        """axes_lens: the position range per rope axis the model was trained for (informational: rope is computed
        for any position, as in ComfyUI). FFN width: 4 * hidden_size (times ffn_dim_multiplier when given), rounded
        up to a multiple of multiple_of; ComfyUI ignores ffn_dim_multiplier, so only None loads there."""
        super().__init__()
        head_dim = hidden_size // num_attention_heads
        if head_dim * num_attention_heads != hidden_size or sum(axes_dim_rope) != head_dim:
            raise ValueError(f"hidden_size {hidden_size} / {num_attention_heads} heads must give a head dim equal to "
                             f"sum(axes_dim_rope) = {sum(axes_dim_rope)}")
        if num_attention_heads % num_kv_heads:
            raise ValueError(f"{num_attention_heads} heads do not split into {num_kv_heads} KV head groups")
        self.patch_size = patch_size
        self.out_channels = out_channels or in_channels
        inner = 4 * hidden_size if ffn_dim_multiplier is None else int(ffn_dim_multiplier * 4 * hidden_size)
        ffn_inner = multiple_of * ((inner + multiple_of - 1) // multiple_of)

        def blocks(n: int, modulation: bool) -> nn.ModuleList:
            return nn.ModuleList(OmniGen2TransformerBlock(hidden_size, num_attention_heads, num_kv_heads, ffn_inner,
                                                          norm_eps, qk_norm_eps, modulation) for _ in range(n))

        patch_dim = patch_size * patch_size * in_channels
        self.x_embedder = nn.Linear(patch_dim, hidden_size)
        self.ref_image_patch_embedder = nn.Linear(patch_dim, hidden_size)
        self.time_caption_embed = Lumina2CombinedTimestepCaptionEmbedding(
            hidden_size, text_feat_dim, frequency_embedding_size, norm_eps, timestep_scale)
        self.noise_refiner = blocks(num_refiner_layers, True)
        self.ref_image_refiner = blocks(num_refiner_layers, True)
        self.context_refiner = blocks(num_refiner_layers, False)
        self.layers = blocks(num_layers, True)
        self.norm_out = LuminaLayerNormContinuous(hidden_size, min(hidden_size, 1024),
                                                  patch_size * patch_size * self.out_channels, final_norm_eps)
        self.image_index_embedding = nn.Parameter(torch.randn(max_ref_images, hidden_size))
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint

    def _embed_refs(self, refs: list[torch.Tensor], batch: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Patch-embedded references concatenated along the sequence, each tagged with its index embedding, and
        their token grids (rows, cols)."""
        if len(refs) > self.config.max_ref_images:
            raise ValueError(f"{len(refs)} reference latents; the model has index embeddings for "
                             f"{self.config.max_ref_images}")
        p = self.patch_size
        tokens, grids = [], []
        for j, ref in enumerate(refs):
            if ref.ndim != 4 or ref.shape[0] not in (1, batch):
                raise ValueError(f"reference latent {j} has shape {tuple(ref.shape)}; expected (1 or {batch}, c, h, w)")
            ref = _pad_to_patch(ref.to(dtype), p)
            grids.append((ref.shape[-2] // p, ref.shape[-1] // p))
            emb = self.ref_image_patch_embedder(_patchify(ref, p)) + self.image_index_embedding[j].to(dtype)
            tokens.append(emb.expand(batch, -1, -1))
        return torch.cat(tokens, dim=1), grids

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                ref_latents: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch_size
        device = x.device
        hidden = _pad_to_patch(x, p)
        rows, cols = hidden.shape[-2] // p, hidden.shape[-1] // p
        sigma = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps.reshape(b)
        # the model's own time runs the other way: 0 = noise, 1 = data
        temb, text = self.time_caption_embed(1.0 - sigma, context, hidden.dtype)
        n = text.shape[1]

        text_mask = None
        if attention_mask is not None:
            valid = attention_mask.to(device).reshape(b, n) != 0
            if not bool(valid.any(dim=1).all()):
                raise ValueError("every sample needs at least one unmasked text token")
            text_mask = None if bool(valid.all()) else valid
        if text_mask is None:
            text_pos = torch.arange(n, device=device).expand(b, n)
            cap_len = torch.full((b,), n, device=device)
        else:
            # valid tokens are numbered as if the padding were not there, so a padded caption is the unpadded one
            text_pos = (text_mask.long().cumsum(dim=1) - 1).clamp(min=0)
            cap_len = text_mask.sum(dim=1)

        refs = list(ref_latents or [])
        ref_tokens, grids = self._embed_refs(refs, b, hidden.dtype) if refs else (None, [])

        # position ids for [text, refs, image]: the first axis of each image is one shift past what came before
        segments = [text_pos[..., None].expand(b, n, 3)]
        shift = 0
        for gr, gc in grids + [(rows, cols)]:
            r, c = _grid_ids(gr, gc, device)
            ids = torch.stack([(cap_len[:, None] + shift).expand(b, gr * gc), r.expand(b, -1), c.expand(b, -1)], -1)
            segments.append(ids)
            shift += max(gr, gc)
        cos, sin = _rope_cos_sin(torch.cat(segments, dim=1), self.config.axes_dim_rope, self.config.rope_theta)
        ref_len = ref_tokens.shape[1] if ref_tokens is not None else 0
        img_len = rows * cols

        for layer in self.context_refiner:
            text = layer(text, text_mask, cos[:, :n], sin[:, :n])

        img = self.x_embedder(_patchify(hidden, p))
        for layer in self.noise_refiner:
            img = layer(img, None, cos[:, n + ref_len:], sin[:, n + ref_len:], temb)
        parts = [text]
        if ref_tokens is not None:
            for layer in self.ref_image_refiner:
                ref_tokens = layer(ref_tokens, None, cos[:, n:n + ref_len], sin[:, n:n + ref_len], temb)
            parts.append(ref_tokens)
        parts.append(img)
        seq = torch.cat(parts, dim=1)

        key_mask = None
        if text_mask is not None:
            key_mask = torch.cat([text_mask, text_mask.new_ones(b, ref_len + img_len)], dim=1)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # diffusers' enable_gradient_checkpointing sets the function (which may checkpoint some layers only)
                seq = self._gradient_checkpointing_func(layer, seq, key_mask, cos, sin, temb)
            else:
                seq = layer(seq, key_mask, cos, sin, temb)

        out = self.norm_out(seq[:, -img_len:], temb)
        out = _unpatchify(out, p, rows, cols)[:, :, :h, :w]
        # ComfyUI's FLOW convention: velocity noise - x0, the negation of OmniGen2's own prediction
        return -out
