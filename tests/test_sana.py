"""Sana: layout and config from shapes (real sizes too), loading against diffusers' own converter, prompt encoding and
sampling against diffusers' SanaPipeline, a training run whose LoRA (original module names, fused q/k/v) merged into
the original weights computes what the trainer computed, resume, and the refusals (Sprint, 2K / 4K, wrong family,
no Gemma)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_family_resumes, job_dict, make_images, merge_lora, quiet
from trainer.config import ModelConfig, load_job_dict
from trainer.demo.sana import sana_diffusers_config, write_sana_files
from trainer.errors import ModelFileError
from trainer.fileio import save_safetensors_atomic
from trainer.job import build_trainer
from trainer.models.files import load_state_dict, safetensors_shapes
from trainer.models.sana import INSTRUCTION, MAX_TOKENS, diffusers_to_original, load_sana, load_sana_transformer
from trainer.models.sana_layout import diffusers_config
from trainer.sampling import denoise, initial_noise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sana(tmp_path_factory) -> dict:
    return write_sana_files(tmp_path_factory.mktemp("sana"), sana_diffusers_config())


@pytest.fixture(scope="module")
def model(sana):
    return _load(sana)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("sana_data") / "data", n=3, size=(32, 32))


def _load(cfg: dict, dtype=torch.float32, **over):
    return load_sana(ModelConfig(**{**{k: v for k, v in cfg.items() if k != "arch"}, **over}), torch.device("cpu"),
                     dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(seed: int = 0, b: int = 2, n: int = MAX_TOKENS):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n)
    mask[0, 7:] = 0  # a short caption beside a long one
    return (torch.randn(b, 32, 6, 4, generator=g), torch.tensor([0.3, 0.8]),
            {"context": torch.randn(b, n, 64, generator=g), "mask": mask})


# --- layout and loading ------------------------------------------------------------------------------------

REAL = {
    # diffusers' transformer/config.json of Sana_600M_1024px_diffusers, Sana_1600M_1024px_diffusers and
    # SANA1.5_1.6B_1024px_diffusers
    "600m": dict(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                 num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                 caption_channels=2304, mlp_ratio=2.5, patch_size=1, sample_size=32, qk_norm=None),
    "1600m": dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, patch_size=1, sample_size=32, qk_norm=None),
    "1.5-1600m": dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                      num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                      caption_channels=2304, mlp_ratio=2.5, patch_size=1, sample_size=32,
                      qk_norm="rms_norm_across_heads"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_config_from_real_shapes(name):
    """At the real sizes (meta device): the original names written hold every tensor, the config read back from
    their shapes (either layout) is the real config, and every LoRA target names an original weight."""
    from diffusers import SanaTransformer2DModel

    from trainer.models.sana import SanaModel

    real = REAL[name]
    with torch.device("meta"):
        model = SanaTransformer2DModel(**real)
    sd = model.state_dict()
    original = diffusers_to_original(sd, real["num_layers"], real["qk_norm"] is not None)
    assert sum(v.numel() for v in original.values()) == sum(v.numel() for v in sd.values())
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert diffusers_config(shapes, name) == real
    assert diffusers_config({k: tuple(v.shape) for k, v in sd.items()}, name) == real
    m = object.__new__(SanaModel)
    m.denoiser = model
    targets = m.targets()
    assert all(f"{t.key.removeprefix('diffusion_model.')}.weight" in shapes for t in targets)
    assert len(targets) == 7 * real["num_layers"]  # qkv, proj, q, kv, proj + two 1x1 convs
    qkv = next(t for t in targets if t.key == "diffusion_model.blocks.0.attn.qkv")
    assert qkv.out_features == shapes["blocks.0.attn.qkv.weight"][0] and len(qkv.members) == 3


def test_single_file_matches_diffusers_converter(sana, model):
    """What diffusers' own single-file converter reads from the original file is what the trainer loaded, and the
    trainer's prediction is the model's velocity at timestep 1000 sigma with the text mask."""
    from diffusers import SanaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

    raw = load_state_dict(Path(sana["name_or_path"]))
    theirs = convert_sana_transformer_to_diffusers(dict(raw))
    ours = model.denoiser.state_dict()
    # diffusers' converter leaves Sana 1.5's q/k norms out (0.42.1): they are compared with the file's directly
    norms = {k for k in ours if ".norm_q." in k or ".norm_k." in k}
    assert set(ours) - norms == set(theirs) and len(norms) == 8
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for k in norms:
        i, attn, which = k.split(".")[1], k.split(".")[2], k.split(".")[3][-1]
        assert torch.equal(ours[k], raw[f"blocks.{i}.{'attn' if attn == 'attn1' else 'cross_attn'}.{which}_norm.weight"])
    theirs.update({k: ours[k] for k in norms})
    ref = SanaTransformer2DModel(**sana_diffusers_config()).eval()
    ref.load_state_dict(theirs)
    noisy, sigmas, cond = _inputs()
    with torch.no_grad():
        got = model.predict(noisy, sigmas, cond)
        want = ref(noisy, encoder_hidden_states=cond["context"], encoder_attention_mask=cond["mask"],
                   timestep=sigmas * 1000).sample
        # and the mask is used: the first caption's padding changes nothing, unmasked it would
        padded = dict(cond, context=cond["context"].clone())
        padded["context"][0, 7:] = 5.0
        assert rel_err(model.predict(noisy, sigmas, padded)[0], got[0]) < 1e-6
        unmasked = dict(padded, mask=torch.ones_like(cond["mask"]))
        assert rel_err(model.predict(noisy, sigmas, unmasked)[0], got[0]) > 1e-3
        # alone, the short caption runs on its 7 tokens without a mask, and computes the same
        one = {"context": padded["context"][:1], "mask": cond["mask"][:1]}
        assert rel_err(model.predict(noisy[:1], sigmas[:1], one), got[:1]) < 1e-6
    assert rel_err(got, want) < 1e-6


def test_diffusers_single_file_and_folder_load_the_same_model(sana, model, tmp_path):
    """The diffusers release's transformer safetensors (diffusers names, ExtraModels reads it too) and a diffusers
    folder give the same weights."""
    sd = model.denoiser.state_dict()
    single = tmp_path / "diffusion_pytorch_model.safetensors"
    save_safetensors_atomic(dict(sd), single, metadata={"sana.num_cross_attention_heads": "2"})
    again = load_sana_transformer(single, torch.float32).state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    model.denoiser.save_pretrained(str(tmp_path / "folder" / "transformer"))
    folder = load_sana_transformer(tmp_path / "folder", torch.float32).state_dict()
    assert all(torch.equal(folder[k], sd[k]) for k in sd)


def test_refusals_name_the_file_and_the_reason(sana, tiny_flux, tmp_path):
    raw = load_state_dict(Path(sana["name_or_path"]))
    sprint = tmp_path / "sana_sprint.safetensors"
    save_safetensors_atomic(dict(raw, **{"cfg_embedder.mlp.0.weight": torch.zeros(64, 256)}), sprint)
    with pytest.raises(ModelFileError, match="Sana Sprint checkpoint.*consistency model"):
        load_sana_transformer(sprint, torch.float32)
    big = tmp_path / "sana_4k.safetensors"
    save_safetensors_atomic(dict(raw, pos_embed=torch.zeros(1, 128 * 128, 64)), big)
    with pytest.raises(ModelFileError, match="2K / 4K"):
        load_sana_transformer(big, torch.float32)
    with pytest.raises(ModelFileError, match="flux checkpoint, but model.arch is 'sana'"):
        _load(dict(sana, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match="Sana needs Gemma-2-2B-it"):
        _load(dict(sana, text_encoder_paths=[]))
    no_heads = tmp_path / "no_heads.safetensors"
    save_safetensors_atomic(raw, no_heads)  # a width no preset has, and no heads in the metadata
    with pytest.raises(ModelFileError, match="width 64 matches no Sana preset"):
        load_sana_transformer(no_heads, torch.float32)


def test_gemma_file_loads_as_transformers_builds_it(sana, model):
    """The Gemma read from a single file (config from shapes, eager attention) computes what transformers' own
    Gemma2Model with those weights computes, computed buffers included (the embedding scale)."""
    from transformers import Gemma2Config, Gemma2Model

    sd = load_state_dict(Path(sana["text_encoder_paths"][0]), prefix="model.")
    cfg = Gemma2Config(vocab_size=sd["embed_tokens.weight"].shape[0], hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=256,
                       attn_implementation="eager")
    ref = Gemma2Model(cfg).eval()
    ref.load_state_dict(sd)
    ids = torch.tensor([[2, 5, 9, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask)[0]
        got = model.gemma(ids, attention_mask=mask)[0]
    assert want[0, :4].abs().mean() > 0.1 and rel_err(got[0, :4], want[0, :4]) < 1e-6


# --- text and sampling against SanaPipeline --------------------------------------------------------------

def _pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    return SanaPipeline(tokenizer=model.tokenizer, text_encoder=model.gemma, vae=model.vae,
                        transformer=model.denoiser,
                        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))


def test_prompt_encoding_matches_pipeline(model):
    """The pipeline given the original's instruction (diffusers' default quotes it differently) encodes as the
    trainer does: 300 tokens (first + last 299) with their mask."""
    prompts = ["a red circle on a blue background", "sks a dog"]
    ours = model.encode_text(prompts)
    embeds, mask, _, _ = _pipeline(model).encode_prompt(prompts, do_classifier_free_guidance=False,
                                                       complex_human_instruction=INSTRUCTION.split("\n"))
    assert ours["context"].shape == (2, MAX_TOKENS, 64) and ours["mask"].shape == (2, MAX_TOKENS)
    assert torch.equal(ours["mask"], mask.float()) and rel_err(ours["context"], embeds) < 1e-6
    assert 0 < ours["mask"][1].sum() < ours["mask"][0].sum() < MAX_TOKENS  # the captions' own lengths
    # the instruction is in: without it the caption's states differ
    bare, _, _, _ = _pipeline(model).encode_prompt(prompts, do_classifier_free_guidance=False,
                                                   complex_human_instruction=None)
    assert rel_err(bare[:, 1:4], ours["context"][:, 1:4]) > 1e-2


def test_sampler_matches_pipeline(model):
    cond, neg = model.encode_text(["a red circle"]), model.encode_text([""])
    noise = initial_noise(model, 64, 64, seed=3)
    assert noise.shape == (1, 32, 16, 16)  # the small DC-AE is 4x
    steps, guidance = 4, 4.5
    ours = denoise(model, noise, cond, neg, steps, guidance)
    theirs = _pipeline(model)(prompt_embeds=cond["context"], prompt_attention_mask=cond["mask"],
                              negative_prompt_embeds=neg["context"], negative_prompt_attention_mask=neg["mask"],
                              height=64, width=64, num_inference_steps=steps, guidance_scale=guidance, latents=noise,
                              output_type="latent", use_resolution_binning=False, negative_prompt=None).images
    err = rel_err(ours, theirs)
    assert err < 1e-3, err
    assert rel_err(denoise(model, noise, cond, None, steps, guidance), theirs) > 10 * err  # CFG matters
    img = model.decode(ours)
    ref = model.vae.decode(theirs / model.vae.config.scaling_factor).sample
    assert img.shape == (1, 3, 64, 64) and rel_err(img, ref.clamp(-1, 1)) < 1e-3


# --- training ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [False, True])
def test_trains_and_the_lora_merged_into_the_original_computes_the_same(sana, data, tmp_path, conv):
    d = job_dict(sana, data, tmp_path / "out", steps=2, cache_text_embeddings=True)
    p = d["config"]["process"][0]
    p["sample"].update(sample_steps=2, width=32, height=32)
    if conv:
        p["network"].update(conv=4, conv_alpha=2)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert next(iter(trainer.latents.mem.values())).shape == (32, 8, 8)
    trainer.train()
    run = tmp_path / "out" / "run"
    sd = load_file(str(run / "run.safetensors"))
    assert sd["diffusion_model.blocks.0.attn.qkv.lora_up.weight"].shape == (3 * 64, 4)
    assert sd["diffusion_model.blocks.1.cross_attn.kv_linear.lora_up.weight"].shape == (2 * 64, 4)
    assert ("diffusion_model.blocks.0.mlp.inverted_conv.conv.lora_down.weight" in sd) == conv
    assert not any("depth_conv" in k for k in sd) and len(list((run / "samples").glob("*.png"))) == 2

    original = load_state_dict(Path(sana["name_or_path"]))
    merged = tmp_path / "merged.safetensors"
    save_safetensors_atomic(merge_lora(original, sd), merged, metadata={"sana.num_cross_attention_heads": "2"})
    noisy, sigmas, cond = _inputs(seed=5)
    with torch.no_grad():
        ours = trainer.model.predict(noisy, sigmas, cond)
        base = _load(sana).predict(noisy, sigmas, cond)
        theirs = _load(dict(sana, name_or_path=str(merged))).predict(noisy, sigmas, cond)
    err, effect = rel_err(theirs, ours), rel_err(ours, base)
    assert err < 1e-4 and effect > 100 * err, (err, effect)


def test_resume_matches_uninterrupted(sana, data, tmp_path):
    assert_family_resumes(sana, data, tmp_path)


def test_demo_files_are_detected_as_sana(tmp_path):
    from trainer.demo.sana import write_sana_demo
    from trainer.models.detect import guess_family

    cfg = write_sana_demo(tmp_path)
    assert guess_family(safetensors_shapes(Path(cfg["name_or_path"]))) == "sana"
