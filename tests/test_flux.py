"""Flux family: layouts, loading errors, prompt encoding and sampling against diffusers' FluxPipeline."""

import pytest
import torch

from trainer.config import ModelConfig
from trainer.errors import ModelFileError
from trainer.fileio import save_safetensors_atomic
from trainer.models.flux import load_flux, pack_latents, unpack_latents
from trainer.models.flux_layout import diffusers_to_original, original_to_diffusers
from trainer.models.files import load_state_dict
from trainer.sampling import denoise, initial_noise


def _load(cfg: dict):
    return load_flux(ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"}), "cpu", torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_layout_roundtrip(tiny_flux):
    from pathlib import Path

    model = _load(tiny_flux).denoiser
    cfg = dict(model.config)
    original = load_state_dict(Path(tiny_flux["name_or_path"]))
    back = diffusers_to_original(model.state_dict(), cfg)
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    again = original_to_diffusers(dict(original), shapes, cfg, "x")
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_pack_unpack_inverse():
    x = torch.randn(2, 16, 6, 4)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 4), x)


def test_wrong_family_checkpoint(tmp_path, tiny_flux):
    p = tmp_path / "sdxl.safetensors"
    save_safetensors_atomic({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
    }, p)
    cfg = dict(tiny_flux, name_or_path=str(p))
    with pytest.raises(ModelFileError, match="sdxl checkpoint, but model.arch is 'flux'"):
        _load(cfg)


def test_hub_id_is_refused_with_advice(tiny_flux):
    cfg = dict(tiny_flux, name_or_path="black-forest-labs/FLUX.1-dev")
    with pytest.raises(ModelFileError, match="never downloads"):
        _load(cfg)


def test_missing_text_encoder_is_named(tiny_flux):
    cfg = dict(tiny_flux, text_encoder_paths=[tiny_flux["text_encoder_paths"][0]])
    with pytest.raises(ModelFileError, match="T5-XXL"):
        _load(cfg)


def test_missing_tokenizer_is_clear(tiny_flux, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    cfg = dict(tiny_flux, tokenizer_paths=[])
    with pytest.raises(ModelFileError, match="no CLIP tokenizer found"):
        _load(cfg)


def _pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=model.guidance_embeds, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    ) if model.guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=sched, vae=model.vae, text_encoder=model.clip, tokenizer=model.clip_tokenizer,
        text_encoder_2=model.t5, tokenizer_2=model.t5_tokenizer, transformer=model.denoiser,
    )


def test_prompt_encoding_matches_pipeline(tiny_flux):
    model = _load(tiny_flux)
    pipe = _pipeline(model)
    prompts = ["a red cat on a blue background", "sks, a dog"]
    ours = model.encode_text(prompts)
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=model.t5_max_length)
    assert rel_err(ours["t5"], embeds) < 1e-6
    assert rel_err(ours["pooled"], pooled) < 1e-6


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_sampler_matches_flux_pipeline(variant, tiny_flux, tiny_flux_schnell):
    model = _load(tiny_flux if variant == "dev" else tiny_flux_schnell)
    pipe = _pipeline(model)
    cond = model.encode_text(["a red circle"])
    noise = initial_noise(model, 32, 24, seed=3)
    steps, guidance = 4, 3.5
    ours = denoise(model, noise, cond, None, steps, guidance)
    h, w = noise.shape[-2:]
    out = pipe(
        prompt_embeds=cond["t5"], pooled_prompt_embeds=cond["pooled"], latents=pack_latents(noise),
        height=h * 2, width=w * 2, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
    ).images
    theirs = unpack_latents(out, h, w)
    assert rel_err(ours, theirs) < 1e-3
    # and the decoded image, through the pipeline's own latent scaling
    img = model.decode(ours)
    ref = model.vae.decode(theirs / model.vae.config.scaling_factor + model.vae.config.shift_factor).sample
    assert rel_err(img, ref.clamp(-1, 1)) < 1e-3


def test_flex1_bypasses_guidance_in_training_only(tiny_flux):
    from trainer.models import registry

    cfg = ModelConfig(**{k: v for k, v in tiny_flux.items() if k != "arch"})
    model = registry.get_family("flex1").load(cfg, "cpu", torch.float32)
    assert model.arch == "flex1" and model.bypass_guidance
    x, s = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    cond = {"t5": torch.randn(1, 8, 32), "pooled": torch.randn(1, 64)}
    with torch.no_grad():
        sampling = [model.predict(x, s, cond, guidance=g) for g in (1.0, 5.0)]
        model.set_train_hooks(True)
        training = [model.predict(x, s, cond, guidance=g) for g in (1.0, 5.0)]
        model.set_train_hooks(False)
    assert not torch.allclose(sampling[0], sampling[1])  # guidance matters when sampling
    torch.testing.assert_close(training[0], training[1])  # and is bypassed in training
    assert not torch.allclose(training[0], sampling[0])
    # plain flux keeps its guidance embedding in training unless asked
    assert not _load(tiny_flux).bypass_guidance
