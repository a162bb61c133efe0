"""HiDream-I1 (Full, Dev, Fast): config from full-size shapes, targets, variants, loading errors, prompt encoding and
sampling against diffusers' HiDreamImagePipeline, the saved LoRA read by diffusers' HiDream LoRA loader, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_family_resumes, job_dict, make_images, quiet
from trainer.config import ModelConfig, load_job_dict
from trainer.demo.hidream import hidream_diffusers_config, llama_test_config, write_hidream_files
from trainer.errors import ConfigError, ModelFileError
from trainer.job import build_trainer
from trainer.models.hidream import VARIANTS, load_hidream, variant_of
from trainer.sampling import denoise, initial_noise


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hd(tmp_path_factory) -> dict:
    return write_hidream_files(tmp_path_factory.mktemp("hidream"))


@pytest.fixture(scope="module")
def model(hd):
    return _load(hd)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("hd_data") / "data", n=3, size=(32, 32))


def _load(cfg: dict, dtype=torch.float32, **over):
    return load_hidream(ModelConfig(**{**{k: v for k, v in cfg.items() if k != "arch"}, **over}), torch.device("cpu"),
                        dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# --- layout and targets ---------------------------------------------------------------------------------------

def test_real_size_config_from_shapes():
    """HiDream-I1's published config (17B: 16 double + 32 single blocks, 20 heads, 4 experts, Llama layers 0..31 then
    31) is what the full-size key set's shapes give."""
    from diffusers import HiDreamImageTransformer2DModel

    from trainer.models.hidream_layout import transformer_config

    real = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
                num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
                llama_layers=list(range(32)) + [31] * 16)
    with torch.device("meta"):
        m = HiDreamImageTransformer2DModel(**real)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert transformer_config(shapes, 32, "x") == real
    assert 16.5e9 < sum(v.numel() for v in m.state_dict().values()) < 17.5e9


def test_targets_are_comfyui_keys_and_experts_opt_in(model):
    from trainer.networks.network import select_targets

    targets = model.targets()
    keys = [t.key for t in targets]
    first = "diffusion_model.double_stream_blocks.0.block.attn1"
    assert keys[:4] == [f"{first}.{a}" for a in ("to_q", "to_k", "to_v", "to_out")]
    assert "diffusion_model.double_stream_blocks.1.block.ff_t.w2" in keys
    assert "diffusion_model.single_stream_blocks.1.block.adaLN_modulation.1" in keys
    assert not any("gate" in k for k in keys)  # the router is a bare weight, not a linear layer
    default = select_targets(targets, [], [])
    assert not any(".experts." in t.key for t in default)
    assert "diffusion_model.single_stream_blocks.0.block.ff_i.shared_experts.w1" in [t.key for t in default]
    # per block: double 8 attention + 3 shared + 3 ff_t + 1 modulation; single 4 + 3 + 1
    assert len(default) == 2 * 15 + 2 * 8
    experts = select_targets(targets, ["ff_i.experts"], [])
    assert len(experts) == 4 * 4 * 3 and all(t.opt_in for t in experts)
    assert len(select_targets(targets, ["stream_blocks"], [])) == len(targets)


def test_opt_in_targets_only_by_name():
    """Target.opt_in: out of the default selection and of ignore-only filters, in when only_if_contains names it."""
    from torch import nn

    from trainer.models.base import Target, TargetMember
    from trainer.networks.network import select_targets

    lin = nn.Linear(2, 2)
    ts = [Target(k, 2, 2, [TargetMember(lin, slice(0, 2))], opt_in=k.endswith("x")) for k in ("a.q", "a.x", "b.x")]
    assert [t.key for t in select_targets(ts, [], [])] == ["a.q"]
    assert [t.key for t in select_targets(ts, [], ["b"])] == ["a.q"]
    assert [t.key for t in select_targets(ts, ["a."], [])] == ["a.q", "a.x"]
    assert [t.key for t in select_targets(ts, [".x"], ["b"])] == ["a.x"]


# --- variants and loading -------------------------------------------------------------------------------------

def test_variant_from_config_or_file_name(hd, tmp_path):
    mc = ModelConfig(name_or_path=hd["name_or_path"])
    assert variant_of(mc, Path("hidream_i1_full_fp16.safetensors")) is VARIANTS["full"]
    assert variant_of(mc, Path("HiDream-I1-Dev")) is VARIANTS["dev"]
    assert variant_of(mc, Path("hidream_i1_fast_fp8.safetensors")) is VARIANTS["fast"]
    assert variant_of(ModelConfig(name_or_path="x", variant="Dev"), Path("hidream_i1_full.safetensors")).name == "dev"
    with pytest.raises(ConfigError, match="does not say whether this is HiDream-I1 Full, Dev or Fast"):
        variant_of(mc, Path("hidream_i1.safetensors"))
    with pytest.raises(ConfigError, match="'turbo' is not a HiDream-I1 variant"):
        variant_of(ModelConfig(name_or_path="x", variant="turbo"), Path("a"))
    dev = _load(hd, variant="dev")
    assert dev.distilled_guidance and dev.sample_shift == 6.0
    assert dev.save_metadata()["modelspec.architecture"] == "HiDream-I1-Dev/lora"
    full = _load(hd)
    assert not full.distilled_guidance and full.sample_shift == 3.0 and _load(hd, sample_shift=2.0).sample_shift == 2.0


def test_variant_key_refused_where_unused(tiny_flux, data, tmp_path):
    d = job_dict(dict(tiny_flux, variant="dev"), data, tmp_path)
    with pytest.raises(ConfigError, match="model.variant: not used by model.arch 'flux'"):
        load_job_dict(d)


def test_wrong_family_and_missing_encoders_are_named(hd, tiny_flux):
    with pytest.raises(ModelFileError, match="this is a flux checkpoint, but model.arch is 'hidream'"):
        _load(hd, name_or_path=tiny_flux["name_or_path"], variant="full")
    with pytest.raises(ModelFileError, match=r"needs Llama-3.1-8B-Instruct \(llama_3.1_8b_instruct_fp8_scaled"):
        _load(hd, text_encoder_paths=hd["text_encoder_paths"][:3])
    with pytest.raises(ModelFileError, match="one CLIP encoder"):
        _load(hd, text_encoder_paths=hd["text_encoder_paths"][1:])
    with pytest.raises(ModelFileError, match="no Llama tokenizer found"):
        _load(hd, tokenizer_paths=hd["tokenizer_paths"][:3])


def _scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout: every 2-D weight as fp8 of weight / scale, the per-tensor `scale_weight`
    beside it, and the `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith(".weight") and "embed" not in k:
            scale = v.abs().max() / 448
            out[k], out[k[:-len("weight")] + "scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale.reshape(1)
        else:
            out[k] = v
    return out


def test_scaled_fp8_files_load_dequantized(hd, model, tmp_path):
    """The transformer and the Llama as ComfyUI's scaled-fp8 files (hidream_i1_*_fp8, llama_3.1_8b_instruct_fp8_scaled)
    load as their dequantized weights: outputs equal the full-precision model's fed those same weights."""
    from trainer.fileio import save_safetensors_atomic

    names = {"transformer": hd["name_or_path"], "llama": hd["text_encoder_paths"][3]}
    q = {n: _scaled_fp8(load_file(p)) for n, p in names.items()}
    paths = {n: tmp_path / f"hidream_i1_full_{n}_fp8.safetensors" for n in names}
    for n in names:
        save_safetensors_atomic(q[n], paths[n])
    quant = _load(hd, name_or_path=str(paths["transformer"]),
                  text_encoder_paths=[*hd["text_encoder_paths"][:3], str(paths["llama"])])
    weight = q["transformer"]["double_stream_blocks.0.block.attn1.to_q.weight"].float() * \
        q["transformer"]["double_stream_blocks.0.block.attn1.to_q.scale_weight"].float()
    assert torch.equal(quant.denoiser.double_stream_blocks[0].block.attn1.to_q.weight, weight)
    ref = _load(hd)
    for mod, qmod in ((ref.denoiser, quant.denoiser), (ref.llama, quant.llama)):
        qsd = qmod.state_dict()
        mod.load_state_dict({k: qsd[k] for k in mod.state_dict()})
    cond = quant.encode_text(["a red circle"])
    assert rel_err(cond["llama"], ref.encode_text(["a red circle"])["llama"]) < 1e-6
    x = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(quant.predict(x, torch.tensor([0.4]), cond), ref.predict(x, torch.tensor([0.4]), cond)) < 1e-6


def test_loads_a_diffusers_folder(hd, model, tmp_path):
    """A diffusers HiDream folder (transformer, vae, text_encoder..text_encoder_4, tokenizer..tokenizer_4): the same
    model as the single files, its variant read from the folder's name."""
    import json

    folder = tmp_path / "HiDream-I1-Dev"
    parts = {"transformer": model.denoiser, "vae": model.vae, "text_encoder": model.clip_l,
             "text_encoder_2": model.clip_g, "text_encoder_3": model.t5, "text_encoder_4": model.llama}
    for sub, m in parts.items():
        m.save_pretrained(str(folder / sub))
    for i, k in enumerate(("clip_l", "clip_g", "t5", "llama")):
        model.tokenizers[k].save_pretrained(str(folder / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HiDreamImagePipeline"}))
    loaded = load_hidream(ModelConfig(name_or_path=str(folder), t5_max_length=32), torch.device("cpu"), torch.float32)
    assert loaded.variant.name == "dev" and loaded.denoiser.config.llama_layers == [0, 1, 1, 1]
    cond, ref = loaded.encode_text(["sks a dog"]), model.encode_text(["sks a dog"])
    assert all(rel_err(cond[k], ref[k]) < 1e-6 for k in ref)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(loaded.predict(x, torch.tensor([0.7]), cond), model.predict(x, torch.tensor([0.7]), cond)) < 1e-6


def test_encoders_told_apart_in_any_order(hd, model):
    shuffled = _load(hd, text_encoder_paths=list(reversed(hd["text_encoder_paths"])))
    assert shuffled.clip_l.config.hidden_size == 32 and shuffled.clip_g.config.hidden_size == 48
    cond, ref = shuffled.encode_text(["a cat"]), model.encode_text(["a cat"])
    assert all(torch.equal(cond[k], ref[k]) for k in ref)


def test_quantize_stores_blocks_and_llama_in_fp8(hd):
    m = _load(hd)
    n, saved = m.quantize()
    assert m.llama.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert m.denoiser.double_stream_blocks[0].block.ff_i.experts[0].w1.weight.dtype == torch.float8_e4m3fn
    assert m.llama.embed_tokens.weight.dtype == torch.float32 and n > 0 and saved > 0


def test_llama_stack_is_kept_in_the_training_dtype(hd):
    """What the text cache holds per caption: the Llama stack (layers x tokens x width) in the training dtype, 2 bytes
    a value in bf16: 128 x 32 x 4096 x 2 = 32 MiB for Llama-3.1-8B."""
    cond = _load(hd, dtype=torch.bfloat16).encode_text(["a red circle"])
    assert cond["llama"].dtype == torch.bfloat16 and cond["llama"].shape == (1, 2, 32, 64)
    assert cond["llama"][0].nbytes == 2 * 32 * 64 * 2 and cond["t5"].dtype == torch.float32


# --- against diffusers' pipeline ------------------------------------------------------------------------------

def _reference_llama(hd: dict):
    """An independent transformers LlamaForCausalLM (the class the pipeline documents), built from the writer's
    config and the file's weights, its LM head unused."""
    from transformers import LlamaForCausalLM

    from trainer.models.text_encoders import load_tokenizer

    sd = load_file(hd["text_encoder_paths"][3])
    vocab = len(load_tokenizer(Path(hd["tokenizer_paths"][3])))
    ref = LlamaForCausalLM(llama_test_config(vocab)).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    return ref


def _pipeline(model, hd: dict | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    tk = model.tokenizers
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=model.variant.shift,
                                                  use_dynamic_shifting=False),
        vae=model.vae, text_encoder=model.clip_l, tokenizer=tk["clip_l"], text_encoder_2=model.clip_g,
        tokenizer_2=tk["clip_g"], text_encoder_3=model.t5, tokenizer_3=tk["t5"],
        text_encoder_4=_reference_llama(hd) if hd else model.llama, tokenizer_4=tk["llama"], transformer=model.denoiser)
    return pipe


def test_prompt_encoding_matches_pipeline(hd, model):
    prompts = ["a red circle on a blue background", "sks a dog"]
    ours = model.encode_text(prompts)
    t5, _, llama, _, pooled, _ = _pipeline(model, hd).encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                                                    max_sequence_length=model.max_length)
    assert ours["llama"].shape == (2, 2, 32, 64) and ours["t5"].shape == (2, 32, 32) and ours["pooled"].shape == (2, 80)
    assert rel_err(ours["t5"], t5) < 1e-6 and rel_err(ours["pooled"], pooled) < 1e-6
    assert rel_err(ours["llama"], llama.transpose(0, 1)) < 1e-5


@pytest.mark.parametrize("variant", ["full", "dev"])
def test_sampler_matches_pipeline(hd, model, variant):
    """Full with classifier-free guidance at its own scale 5; Dev without (a guidance given is not applied)."""
    m = model if variant == "full" else _load(hd, variant="dev")
    cond, neg = m.encode_text(["a red circle"]), m.encode_text([""])
    noise = initial_noise(m, 64, 64, seed=3)
    assert noise.shape == (1, 16, 8, 8)
    steps, guidance = 4, 5.0
    ours = denoise(m, noise, cond, neg, steps, guidance)
    pipe = _pipeline(m)
    pipe.default_sample_size = 8  # its resize to 1024x1024-equivalent area becomes 64x64: the size sampled here
    theirs = pipe(prompt_embeds_t5=cond["t5"], prompt_embeds_llama3=cond["llama"].transpose(0, 1),
                  pooled_prompt_embeds=cond["pooled"], negative_prompt_embeds_t5=neg["t5"],
                  negative_prompt_embeds_llama3=neg["llama"].transpose(0, 1),
                  negative_pooled_prompt_embeds=neg["pooled"],
                  height=64, width=64, num_inference_steps=steps, guidance_scale=guidance if m.variant.cfg else 0.0,
                  latents=noise, output_type="latent").images
    err = rel_err(ours, theirs)
    assert err < 1e-3, err
    if variant == "full":  # and CFG matters: without it the result differs
        assert rel_err(denoise(m, noise, cond, None, steps, guidance), theirs) > 10 * err
    img = m.decode(ours)
    ref = m.vae.decode(theirs / m.vae.config.scaling_factor + m.vae.config.shift_factor).sample
    assert img.shape == (1, 3, 64, 64) and rel_err(img, ref.clamp(-1, 1)) < 1e-3


# --- training -------------------------------------------------------------------------------------------------

def test_trains_and_diffusers_reads_the_lora(hd, data, tmp_path):
    d = job_dict(hd, data, tmp_path / "out", steps=2, cache_text_embeddings=True)
    d["config"]["process"][0]["sample"].update(sample_steps=2, width=32, height=32)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert next(iter(trainer.latents.mem.values())).shape == (16, 4, 4)
    trainer.train()
    run = tmp_path / "out" / "run"
    sd = load_file(str(run / "run.safetensors"))
    assert "diffusion_model.double_stream_blocks.0.block.attn1.to_q_t.lora_down.weight" in sd
    assert "diffusion_model.single_stream_blocks.1.block.ff_i.shared_experts.w2.lora_up.weight" in sd
    assert not any(".experts." in k for k in sd) and len(list((run / "samples").glob("*.png"))) == 2

    # diffusers' HiDream LoRA loader reads the file's tensors into a fresh model. It takes the ComfyUI keys
    # (`diffusion_model.` prefix) but only PEFT's tensor names and no alphas (it refuses keys without "lora"): the
    # test renames lora_down / lora_up to lora_A / lora_B and leaves the alphas out, which equal the rank here
    # (scale 1, what it assumes). ComfyUI reads the file as it is (tests/integration/test_comfyui_hidream.py).
    from diffusers import HiDreamImagePipeline

    assert all(float(v) == 4.0 for k, v in sd.items() if k.endswith(".alpha"))
    g = torch.Generator().manual_seed(1)
    noisy, sigmas = torch.randn(1, 16, 6, 4, generator=g), torch.tensor([0.6])
    cond = {"t5": torch.randn(1, 8, 32, generator=g), "llama": torch.randn(1, 2, 8, 64, generator=g),
            "pooled": torch.randn(1, 80, generator=g)}
    with torch.no_grad():
        ours = trainer.model.predict(noisy, sigmas, cond)
        base = _load(hd).predict(noisy, sigmas, cond)
    fresh = _load(hd)
    pipe = HiDreamImagePipeline(None, None, None, None, None, None, None, None, None, None, transformer=fresh.denoiser)
    peft = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in sd.items()
            if not k.endswith(".alpha")}
    pipe.load_lora_weights(peft)
    with torch.no_grad():
        theirs = fresh.predict(noisy, sigmas, cond)
    err, effect = rel_err(theirs, ours), rel_err(ours, base)
    assert err < 1e-4 and effect > 100 * err, (err, effect)


def test_resume_matches_uninterrupted(hd, data, tmp_path):
    assert_family_resumes(hd, data, tmp_path)


def test_demo_config_is_detected_by_the_trainer(tmp_path):
    from trainer.demo.hidream import write_hidream_demo
    from trainer.models.detect import guess_family
    from trainer.models.files import safetensors_shapes

    cfg = write_hidream_demo(tmp_path)
    assert guess_family(safetensors_shapes(Path(cfg["name_or_path"]))) == "hidream"
    assert write_hidream_demo(tmp_path) == cfg  # files already written are reused
    assert hidream_diffusers_config()["llama_layers"] == [0, 1, 1, 1]
