"""Random checkpoints that real ComfyUI detects as SDXL and as Wan 2.1, with the text encoders and VAEs its
loaders need. Runs inside ComfyUI's python (the Wan files take their names and shapes from ComfyUI's own
modules, built on the meta device; nothing of ComfyUI is copied).

Sizes are the smallest ComfyUI still detects:
  - SDXL: ComfyUI matches model_channels 320, context 2048, adm 2816 and transformer depths [0,0,2,2,10,10],
    but not the channel multipliers: widths (320, 320, 320) give a 283M UNet it loads as SDXL. Its SDXL
    CLIP is CLIP-L + OpenCLIP-G at full size (the configs are fixed), random here.
  - Wan 2.1: ComfyUI reads dim / ffn / layers from the shapes: dim 128 (one head of 128), 2 blocks. The
    text encoder is UMT5-XXL at full size (fixed config; fp8 storage, 5.7 GB) with a small SentencePiece
    vocabulary trained here; the Wan VAE takes its width from the shapes (dim 16).
Files are cached in `cache` (they take a minute to write) under names that carry the layout version.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

VERSION = 1
WORDS = ("a photo of the red green blue cat dog tree house sky on in with and small big bright dark "
         "painting sketch style eri trigger word sample image").split()


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def _random(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """1/sqrt(fan_in) matrices and kernels, unit norm scales (`gamma` included), small nonzero biases;
    generated in row chunks so a 1B-entry embedding never exists in float32 at once."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if len(shape) >= 2 and not k.endswith("gamma"):
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.empty(shape, dtype=dtype)
            rows = max(1, (1 << 26) // max(1, fan_in))
            for i in range(0, shape[0], rows):
                t[i:i + rows] = (torch.randn((min(rows, shape[0] - i), *shape[1:]), generator=g) / fan_in**0.5).to(dtype)
        elif k.endswith("gamma") or (k.endswith(".weight") and ("norm" in k or "ln" in k)):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (0.02 * torch.randn(shape, generator=g)).to(dtype)
        out[k] = t
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def _clip_shapes(hidden: int, layers: int, heads: int, inner: int, act: str, projection: int | None) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or hidden)
    with torch.device("meta"):
        m = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in _shapes(m).items()}


def sdxl_files(cache: Path) -> dict:
    """UNet (bare, diffusion_models layout), clip_l, clip_g, vae; ComfyUI detects the UNet as SDXL."""
    import sys

    from trainer.demo import tiny
    from trainer.demo.sdxl import random_unet_ldm, sdxl_unet_config

    folder = cache / f"sdxl_v{VERSION}"
    files = {n: folder / f"{n}.safetensors" for n in ("unet", "clip_l", "clip_g", "vae")}
    if all(p.exists() for p in files.values()):
        return {k: str(v) for k, v in files.items()}
    folder.mkdir(parents=True, exist_ok=True)
    print("writing the SDXL fixtures (283M UNet, full-size random CLIP-L/G)", file=sys.stderr, flush=True)
    cfg = sdxl_unet_config(widths=(320, 320, 320), layers=2, depths=(0, 2, 10), context=2048, pooled=1280)
    _save(random_unet_ldm(cfg, 21, torch.float16), files["unet"])
    clip_l = _random(_clip_shapes(768, 12, 12, 3072, "quick_gelu", None), 22, torch.float16)
    clip_l["text_projection.weight"] = torch.eye(768, dtype=torch.float16)  # real clip_l files carry one
    _save(clip_l, files["clip_l"])
    _save(_random(_clip_shapes(1280, 32, 20, 5120, "gelu", 1280), 23, torch.float16), files["clip_g"])
    # ComfyUI builds SD VAEs at their fixed size (128 channels x [1, 2, 4, 4], two blocks per level)
    _save(tiny.random_weights(tiny.ldm_vae_shapes([128, 256, 512, 512], 2, 4), 24, torch.float16), files["vae"])
    return {k: str(v) for k, v in files.items()}


def _spiece_model() -> torch.Tensor:
    """A small SentencePiece model (pad 0, eos 1, unk 2, as UMT5's) as the uint8 tensor ComfyUI reads."""
    import sentencepiece as spm

    buf = io.BytesIO()
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=64,
                                   model_type="word", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def wan_files(cache: Path) -> dict:
    """Wan 2.1 T2V transformer (dim 128, 2 blocks), UMT5-XXL (fp8) with its tokenizer inside, Wan 2.1 VAE."""
    import sys

    from comfy.ldm.wan.model import WanModel
    from comfy.ldm.wan.vae import WanVAE
    from transformers import UMT5Config, UMT5EncoderModel

    import comfy.ops

    folder = cache / f"wan_v{VERSION}"
    files = {n: folder / f"{n}.safetensors" for n in ("unet", "umt5", "vae")}
    if all(p.exists() for p in files.values()):
        return {k: str(v) for k, v in files.items()}
    folder.mkdir(parents=True, exist_ok=True)
    print("writing the Wan fixtures (UMT5-XXL at full size in fp8: 5.7 GB)", file=sys.stderr, flush=True)
    with torch.device("meta"):
        dit = WanModel(model_type="t2v", dim=128, ffn_dim=256, num_heads=1, num_layers=2, in_dim=16, out_dim=16,
                       operations=comfy.ops.disable_weight_init)
        vae = WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True])
    _save(_random(_shapes(dit), 31, torch.float16), files["unet"])
    _save(_random(_shapes(vae), 32, torch.float32), files["vae"])
    cfg = json.loads((Path(comfy.ops.__file__).parent / "text_encoders" / "umt5_config_xxl.json").read_text())
    cfg = UMT5Config(**{k: v for k, v in cfg.items() if k not in ("model_type",)})
    with torch.device("meta"):
        t5 = UMT5EncoderModel(cfg)
    shapes = {k: v for k, v in _shapes(t5).items() if k != "encoder.embed_tokens.weight"}
    spiece = _spiece_model()
    sd = _random(shapes, 33, torch.float8_e4m3fn)
    sd["spiece_model"] = spiece
    _save(sd, files["umt5"])
    return {k: str(v) for k, v in files.items()}


FLUX_CTX = 768  # ComfyUI's T5-XXL is fixed-size: this Flux is fed by CLIP-L alone


def flux_files(cache: Path) -> dict:
    """A Flux (hidden 3072: what ComfyUI detects as Flux; 1 double + 1 single block) with 768-wide text
    inputs, a CLIP-L of ComfyUI's fixed shape (CLIPLoader type stable_diffusion) and a 16-channel VAE."""
    from trainer.demo import flux as demo_flux
    from trainer.demo import tiny

    folder = cache / f"flux_v{VERSION}"
    files = {n: folder / f"{n}.safetensors" for n in ("unet", "clip", "vae")}
    if all(p.exists() for p in files.values()):
        return {k: str(v) for k, v in files.items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg = demo_flux.flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=FLUX_CTX,
                                     pooled_dim=FLUX_CTX, guidance=True)
    demo_flux.make_flux_file(files["unet"], cfg, dtype=torch.bfloat16)
    # CLIP-L as comfy/sd1_clip_config.json builds it, plus the text projection ComfyUI's CLIPTextModel has
    clip = _random(_clip_shapes(768, 12, 12, 3072, "quick_gelu", None), 5, torch.float16)
    clip["text_projection.weight"] = torch.eye(768, dtype=torch.float16)
    _save(clip, files["clip"])
    tiny.make_vae_file(files["vae"], [128, 256, 512, 512], layers=2, latent=16, dtype=torch.bfloat16)
    return {k: str(v) for k, v in files.items()}


# ComfyUI's OmniGen2 constructor arguments (what model_detection sets at full size)
OMNIGEN2_COMFY_KEYS = ("patch_size", "in_channels", "out_channels", "hidden_size", "num_layers", "num_refiner_layers",
                       "num_attention_heads", "num_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
                       "axes_dim_rope", "axes_lens", "text_feat_dim", "timestep_scale")


def omnigen2_files(cache: Path, comfyui: str) -> dict:
    """A small OmniGen2 (trainer.demo.omnigen2: hidden 240, 2 layers, 1 refiner layer per refiner, 64-wide text) with
    the small constructor arguments ComfyUI's own Omnigen2 model is built with (ComfyUI fixes the config at full
    size: `unet_config`, JSON), a small Qwen2.5 (2 heads and 2 KV heads of 128, which ComfyUI detects as Qwen2.5-VL-3B;
    its vocab that of ComfyUI's own qwen25_tokenizer) with its Qwen25_3BConfig override (`qwen_config`, JSON, for
    model_options["qwen25_3b_model_config"]) and a 16-channel Flux-layout VAE (8x, Flux's widths)."""
    from transformers import AutoTokenizer

    from trainer.demo import omnigen2 as demo_og
    from trainer.demo import tiny
    from trainer.models.omnigen2_transformer import OmniGen2Transformer

    folder = cache / f"omnigen2_v{VERSION}"
    files = {n: folder / f"{n}.safetensors" for n in ("unet", "clip", "vae")}
    files["unet_config"], files["qwen_config"] = folder / "unet_config.json", folder / "qwen_config.json"
    if all(p.exists() for p in files.values()):
        return {k: str(v) for k, v in files.items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg = demo_og.omnigen2_config()
    demo_og.make_omnigen2_file(files["unet"], cfg)
    with torch.device("meta"):
        full_cfg = OmniGen2Transformer(**cfg).config
    small = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in full_cfg.items()
             if k in OMNIGEN2_COMFY_KEYS}
    files["unet_config"].write_text(json.dumps(small))
    vocab = len(AutoTokenizer.from_pretrained(str(Path(comfyui) / "comfy" / "text_encoders" / "qwen25_tokenizer")))
    hidden, heads = cfg["text_feat_dim"], 2
    demo_og.make_qwen_file(files["clip"], vocab, hidden, layers=1, heads=heads, kv_heads=heads)
    files["qwen_config"].write_text(json.dumps(
        {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 1,
         "num_attention_heads": heads, "num_key_value_heads": heads}))
    # ComfyUI builds a 16-channel ldm VAE at Flux's fixed widths (it reads no widths from the file)
    tiny.make_vae_file(files["vae"], [128, 256, 512, 512], layers=2, latent=16)
    return {k: str(v) for k, v in files.items()}
