"""HunyuanVideo (T2V): layouts against diffusers' single-file converter and ComfyUI's renaming, loading from the
files users keep (both key layouts), prompt encoding and sampling against HunyuanVideoPipeline, the token refiner
as an opt-in target, the training guidance, and training on video clips with resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import job_dict, quiet, run_through_and_resumed
from trainer.config import ModelConfig, load_job_dict
from trainer.demo.hunyuan_video import hunyuan_diffusers_config, make_hunyuan_file, write_hunyuan_files
from trainer.demo.videos import make_video_dataset
from trainer.errors import ConfigError, ModelFileError
from trainer.job import build_trainer
from trainer.models.hunyuan_video import PROMPT_TEMPLATE, load_hunyuan_video
from trainer.sampling import denoise, initial_noise


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hy(tmp_path_factory) -> dict:
    return write_hunyuan_files(tmp_path_factory.mktemp("hunyuan"), clip_hidden=64)


@pytest.fixture(scope="module")
def hy_model(hy):
    return _load(hy)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_video_dataset(tmp_path_factory.mktemp("clips") / "data", n=3, size=(32, 32), frames=12, fps=24)


def _load(cfg: dict):
    return load_hunyuan_video(ModelConfig(**cfg), torch.device("cpu"), torch.float32)


def _video_job(model: dict, data: Path, out: Path, **train) -> dict:
    d = job_dict(model, data, out, **train)
    p = d["config"]["process"][0]
    p["datasets"][0].update(num_frames=5, resolution=[32])
    p["sample"].update(width=32, height=32, num_frames=5)
    return d


def _pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    return HunyuanVideoPipeline(text_encoder=model.llama, tokenizer=model.llama_tokenizer, transformer=model.denoiser,
                                vae=model.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=model.clip, tokenizer_2=model.clip_tokenizer)


# --- layouts --------------------------------------------------------------------------------------------------

def _real_config(**over) -> dict:
    """HunyuanVideo 13B's transformer config (hidden 3072 in 24 heads, 20 double / 40 single blocks)."""
    cfg = hunyuan_diffusers_config(hidden=3072, double=20, single=40, text_dim=4096, pooled_dim=768)
    cfg.update(over)
    return cfg


def test_original_layout_agrees_with_diffusers_converter():
    """Our original-layout file, read by diffusers' own single-file converter, lands every row of every diffusers
    tensor where it was (its converter splits linear1 at 3072: the real width, 2 blocks of each kind)."""
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    from trainer.models.hunyuan_video_layout import diffusers_to_original

    cfg = _real_config(num_layers=2, num_single_layers=2)
    with torch.device("meta"):
        m = HunyuanVideoTransformer3DModel(**cfg)
    # every row of every tensor tagged: the tensor's index * 1e5 + the row
    tagged = {k: i * 1e5 + torch.arange(v.shape[0], dtype=torch.float64) for i, (k, v) in enumerate(m.state_dict().items())}
    original = diffusers_to_original(dict(tagged), cfg)
    assert "double_blocks.1.img_attn_qkv.weight" in original and "single_blocks.0.modulation.linear.bias" in original
    back = convert_hunyuan_video_transformer_to_diffusers(dict(original))
    assert set(back) == set(tagged) and all(torch.equal(back[k], tagged[k]) for k in tagged)


def test_comfyui_names_round_trip_and_configs_from_shapes():
    """ComfyUI's renaming of the original keys and back is the identity on every key; the config read from either
    layout's shapes is HunyuanVideo 13B's."""
    from diffusers import HunyuanVideoTransformer3DModel

    from trainer.models.hunyuan_video_layout import (comfy_key, diffusers_config_from_original, diffusers_to_original,
                                                     original_key)

    cfg = _real_config()
    with torch.device("meta"):
        m = HunyuanVideoTransformer3DModel(**cfg)
    sd = dict(m.state_dict())
    original, comfy = diffusers_to_original(sd, cfg), diffusers_to_original(sd, cfg, comfy_names=True)
    assert sorted(comfy_key(k) for k in original) == sorted(comfy)
    assert all(original_key(comfy_key(k)) == k for k in original)
    for k in ("double_blocks.3.img_attn.qkv.weight", "double_blocks.3.img_mod.lin.weight", "double_blocks.3.txt_mlp.0.bias",
              "double_blocks.3.img_attn.norm.query_norm.scale", "single_blocks.39.modulation.lin.weight",
              "single_blocks.39.norm.key_norm.scale", "txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight",
              "txt_in.t_embedder.in_layer.weight", "time_in.out_layer.bias", "guidance_in.in_layer.weight"):
        assert k in comfy, k
    for layout in (original, comfy):
        derived = diffusers_config_from_original({k: tuple(v.shape) for k, v in layout.items()}, "x")
        assert {k: derived[k] for k in cfg} == {k: tuple(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def test_vae_names_are_comfyuis():
    """The diffusers VAE's keys under ComfyUI's LDM names: one name each, the decoder's levels counted from the other
    end (the integration test builds ComfyUI's own VAE and compares every key and shape)."""
    from diffusers import AutoencoderKLHunyuanVideo

    from trainer.models.hunyuan_video_layout import vae_key_to_comfy

    with torch.device("meta"):
        keys = list(AutoencoderKLHunyuanVideo().state_dict())  # the real VAE's structure
    names = {vae_key_to_comfy(k, 4): k for k in keys}
    assert len(names) == len(keys) == 248
    assert names["decoder.up.3.upsample.conv.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.conv.weight"
    assert names["decoder.up.0.block.0.nin_shortcut.conv.weight"] == "decoder.up_blocks.3.resnets.0.conv_shortcut.conv.weight"
    assert names["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert names["encoder.mid.block_2.conv1.conv.bias"] == "encoder.mid_block.resnets.1.conv1.conv.bias"
    assert names["encoder.norm_out.weight"] == "encoder.conv_norm_out.weight"


def test_loads_either_layout_with_the_same_output(hy, hy_model, tmp_path):
    """A file saved under ComfyUI's names (what ComfyUI holds after loading) loads into the same model."""
    comfy_file = tmp_path / "renamed.safetensors"
    make_hunyuan_file(comfy_file, hunyuan_diffusers_config(text_dim=128, pooled_dim=64), comfy_names=True)
    assert "double_blocks.0.img_attn.qkv.weight" in load_file(str(comfy_file))
    renamed = _load(dict(hy, name_or_path=str(comfy_file)))
    a, b = dict(hy_model.denoiser.state_dict()), renamed.denoiser.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_targets_and_refusals(hy, hy_model, tiny_flux, tmp_path):
    from trainer.networks.network import select_targets

    targets = hy_model.targets()
    default = select_targets(targets, [], [])
    keys = [t.key for t in default]
    assert len(keys) == 2 * 10 + 2 * 3 and keys[:3] == ["diffusion_model.double_blocks.0.img_mod.lin",
                                                       "diffusion_model.double_blocks.0.txt_mod.lin",
                                                       "diffusion_model.double_blocks.0.img_attn.qkv"]
    assert "diffusion_model.single_blocks.1.linear1" in keys and not any("txt_in" in k for k in keys)
    qkv = next(t for t in default if t.key.endswith("double_blocks.0.img_attn.qkv"))
    assert [m.rows for m in qkv.members] == [slice(0, 128), slice(128, 256), slice(256, 384)]
    # the token refiner trains when only_if_contains names it (and then only what the filter names)
    refiner = select_targets(targets, ["individual_token_refiner"], [])
    assert [t.key for t in refiner][:2] == ["diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv",
                                            "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.proj"]
    assert len(refiner) == 10 and len(select_targets(targets, ["txt_in", "blocks."], [])) == 36
    assert hy_model.is_video and hy_model.pixel_factor == 16 and hy_model.snap_frames(12) == 9
    # the Llama text model from the llava_llama3 layout: its rotary frequencies computed, not read
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama = hy_model.llama
    assert llama.config.num_hidden_layers == 3 and llama.config.num_key_value_heads == 1
    assert torch.equal(llama.rotary_emb.inv_freq, LlamaRotaryEmbedding(llama.config).inv_freq)

    with pytest.raises(ModelFileError, match="this is a flux checkpoint, but model.arch is 'hunyuan_video'"):
        _load(dict(hy, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match="llava-llama-3-8B"):
        _load(dict(hy, text_encoder_paths=hy["text_encoder_paths"][1:]))
    i2v = tmp_path / "i2v.safetensors"
    make_hunyuan_file(i2v, dict(hunyuan_diffusers_config(text_dim=128, pooled_dim=64), in_channels=33))
    with pytest.raises(ModelFileError, match="image-to-video HunyuanVideo \\(33 input channels"):
        _load(dict(hy, name_or_path=str(i2v)))
    with pytest.raises(ModelFileError, match="not a HunyuanVideo VAE"):
        _load(dict(hy, vae_path=tiny_flux["vae_path"]))


def test_scaled_fp8_llama_loads_dequantized(hy, tmp_path):
    """ComfyUI's llava_llama3_fp8_scaled layout (fp8 layer weights with a per-tensor `scale_weight`, the
    `scaled_fp8` marker, an LM head beside): the weights load as fp8 x scale."""
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.text_encoders import identify_text_encoder, load_llama_encoder

    sd = load_file(hy["text_encoder_paths"][0])
    q, expect = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.startswith("model.layers.") and v.dim() == 2:
            scale = v.abs().max() / 448
            q[k] = (v / scale).to(torch.float8_e4m3fn)
            q[k[:-len("weight")] + "scale_weight"] = scale.reshape(1)
            expect[k[len("model."):]] = q[k].float() * scale
        else:
            q[k] = v
    path = tmp_path / "llava_llama3_fp8_scaled.safetensors"
    save_safetensors_atomic(q, path)
    ef = identify_text_encoder(path)
    assert (ef.kind, ef.prefix) == ("llama", "model.")
    got = load_llama_encoder(ef, torch.float32).state_dict()
    assert expect and all(torch.equal(got[k], v) for k, v in expect.items())


def test_llama_tokenizer_missing_is_named(hy, clips, tmp_path, monkeypatch):
    """Without model.tokenizer_paths and no ComfyUI install holding Llama 3's tokenizer.json, the check before
    loading says so (ComfyUI's llama_tokenizer folder without tokenizer.json does not count)."""
    from trainer.job import check_before_loading

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    fake = tmp_path / "ComfyUI"
    (fake / "comfy" / "text_encoders" / "llama_tokenizer").mkdir(parents=True)
    (fake / "comfy" / "text_encoders" / "llama_tokenizer" / "tokenizer_config.json").write_text("{}")
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    d = _video_job(dict(hy, tokenizer_paths=[]), clips, tmp_path / "out")
    with pytest.raises(ModelFileError, match="no Llama tokenizer found .*llama_tokenizer.*model.tokenizer_paths"):
        check_before_loading(load_job_dict(d))


# --- against the reference pipeline ---------------------------------------------------------------------------

def test_prompt_encoding_matches_pipeline(hy_model):
    """HunyuanVideoPipeline.encode_prompt with the model's template (ours is the same text) and its crop: the
    Llama states, the mask and CLIP's pooled output are ours; the crop starts at the prompt's first token."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    model = hy_model
    assert DEFAULT_PROMPT_TEMPLATE["template"] == PROMPT_TEMPLATE
    prompts = ["a red circle moving", "sks a blue square on a black background"]
    ours = model.encode_text(prompts)
    template = {"template": PROMPT_TEMPLATE, "crop_start": model.crop_start}
    context, pooled, mask = _pipeline(model).encode_prompt(prompts, prompt_template=template, device="cpu")
    assert ours["context"].shape == (2, 256, 128) and ours["pooled"].shape == (2, 64)
    torch.testing.assert_close(ours["context"], context.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled.float(), rtol=0, atol=1e-6)
    assert torch.equal(ours["mask"], mask.float())
    tok = model.llama_tokenizer
    kept = tok(PROMPT_TEMPLATE.format(prompts[0])).input_ids[model.crop_start:]
    assert kept == tok(prompts[0], add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert ours["mask"][0].sum() == len(kept) and ours["mask"][1].sum() == 9


def test_sampler_matches_pipeline_with_distilled_guidance(hy_model):
    """The preview sampler with guidance 6 (the embedding, no CFG) gives HunyuanVideoPipeline's latents."""
    model = hy_model
    cond = model.encode_text(["a red circle moving"])
    noise = initial_noise(model, 32, 48, seed=3, frames=9)
    assert noise.shape == (1, 16, 3, 6, 4)
    ours = denoise(model, noise, cond, None, steps=4, guidance_scale=6.0)
    theirs = _pipeline(model)(prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"],
                              prompt_attention_mask=cond["mask"], height=48, width=32, num_frames=9,
                              num_inference_steps=4, guidance_scale=6.0, latents=noise, output_type="latent").frames
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-3, err
    assert model.decode(ours).shape == (1, 3, 9, 48, 32)


def test_batch_of_prompts_of_different_lengths(hy_model):
    """Prompts of different lengths in one batch: the padding dropped past the longest prompt, the rest masked,
    each sample equals the transformer given all 256 tokens."""
    model = hy_model
    cond = model.encode_text(["a red circle", "sks a blue square on a black background moving left"])
    g = torch.Generator().manual_seed(2)
    x, s = torch.randn(2, 16, 2, 4, 4, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = model.predict(x, s, cond, guidance=3.0)
        full = model.denoiser(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond["context"],
                              encoder_attention_mask=cond["mask"], pooled_projections=cond["pooled"],
                              guidance=torch.full((2,), 3000.0), return_dict=False)[0]
    assert float((ours - full).abs().max() / full.abs().max()) < 1e-5


# --- training -------------------------------------------------------------------------------------------------

def test_trains_on_clips_with_guidance_one_and_saves_comfyui_keys(hy, clips, tmp_path):
    d = _video_job(hy, clips, tmp_path / "out", steps=2, cache_text_embeddings=True)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    model = trainer.model
    assert model.llama is None and model.clip is None  # released once the captions were encoded
    lat = next(iter(trainer.latents.mem.values()))
    assert lat.shape == (16, 2, 4, 4)  # 5 frames -> 2 latent frames, 32 px -> 4
    seen = []
    emb = model.denoiser.time_text_embed.guidance_embedder
    handle = emb.register_forward_pre_hook(lambda m, args: seen.append((torch.is_grad_enabled(), float(args[0].abs().sum()))))
    trainer.train()
    handle.remove()
    # the training steps embedded guidance 1 (the sinusoid of 1000); previews the sample's 3.5
    from diffusers.models.embeddings import get_timestep_embedding

    def proj(g: float) -> float:
        return float(get_timestep_embedding(torch.tensor([g * 1000]), 256, flip_sin_to_cos=True,
                                            downscale_freq_shift=0).abs().sum())

    train = [v for grad, v in seen if grad]
    assert len(train) == 2 and all(abs(v - proj(1.0)) < 1e-3 for v in train)
    assert any(abs(v - proj(3.5)) < 1e-3 for grad, v in seen if not grad)
    run = tmp_path / "out" / "run"
    sd = load_file(str(run / "run.safetensors"))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in sd
    assert "diffusion_model.single_blocks.1.linear1.lora_up.weight" in sd and not any("txt_in" in k for k in sd)
    assert sorted(p.suffix for p in (run / "samples").glob("000000002_00.*")) == [".mp4", ".png"]


def test_train_guidance_is_settable_and_family_keys_checked(hy, clips, tmp_path, tiny_flux):
    d = _video_job(dict(hy, train_guidance=2.0, train_shift=5.0, sample_shift=9.0), clips, tmp_path, steps=1)
    job = load_job_dict(d)
    from trainer.job import load_model

    model = load_model(job, torch.device("cpu"), torch.float32)
    assert (model.train_guidance, model.train_shift(), model.sample_shift) == (2.0, 5.0, 9.0)
    assert float(model.sample_sigmas(4, (1, 16, 2, 4, 4))[1]) == pytest.approx(9 * 0.75 / (1 + 8 * 0.75))
    d = job_dict(dict(tiny_flux, train_guidance=2.0), clips, tmp_path)
    with pytest.raises(ConfigError, match="model.train_guidance: not used by model.arch 'flux'"):
        load_job_dict(d)


def test_resume_on_video_clips_matches_uninterrupted(hy, clips, tmp_path):
    extra = dict(steps=4, lr_scheduler="cosine", cache_text_embeddings=True, disable_sampling=True)
    d = _video_job(hy, clips, tmp_path / "a", **extra)
    d["config"]["process"][0]["datasets"][0].update(frames=[1, 5], shrink_video_to_frames=False, clips_per_video=2)
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_blocks_attend_unmasked_only_without_padding(hy_model, monkeypatch):
    """A batch whose prompts fill their rows reaches SDPA without a mask (so its flash kernel can run), with the same
    prediction as the padded, masked 256 tokens; a batch with padding left, or a direct call of the transformer with
    a padded mask (the pipeline's), keeps the mask."""
    model = hy_model
    masks: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    blocks = len(model.repeated_blocks())
    one = model.encode_text(["a red circle moving"])
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.7])
    with torch.no_grad():
        ours = model.predict(x, s, one, guidance=1.0)
        unmasked = masks[-blocks:]
        reference = model.denoiser(hidden_states=x, timestep=s * 1000, encoder_hidden_states=one["context"],
                                   encoder_attention_mask=one["mask"], pooled_projections=one["pooled"],
                                   guidance=torch.tensor([1000.0]), return_dict=False)[0]
        direct = masks[-blocks:]
        two = model.encode_text(["a red circle moving", "sks a blue square on a black background"])
        model.predict(x.expand(2, -1, -1, -1, -1), s, two, guidance=1.0)
        padded = masks[-blocks:]
    assert not any(unmasked) and all(direct) and all(padded)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
