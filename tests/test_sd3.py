"""SD3 / SD 3.5 family: layout and config from shapes (real sizes too), loading (full checkpoint, bare transformer +
separate files, diffusers folder), prompt encoding and sampling against diffusers' StableDiffusion3Pipeline, a
training run, and its LoRA file in diffusers' own SD3 LoRA loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import job_dict, make_images
from trainer.config import ModelConfig, load_job_dict
from trainer.errors import ModelFileError
from trainer.fileio import save_safetensors_atomic
from trainer.models.files import load_state_dict
from trainer.models.sd3 import SD3Model, load_sd3
from trainer.demo.sd3 import sd3_diffusers_config, write_sd3_files
from trainer.models.sd3_layout import diffusers_config_from_original, diffusers_to_original
from trainer.sampling import denoise, initial_noise

PREFIX = "model.diffusion_model."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3_full(tmp_path_factory) -> dict:
    """One ComfyUI/Stability-style checkpoint: MMDiT (3.5 qk-norm, dual attention in block 0) + CLIP-L + CLIP-G +
    T5 + VAE. diffusers' test-sized transformer: width 32 in 4 heads of 8, 2 blocks."""
    return write_sd3_files(tmp_path_factory.mktemp("sd3_full"), sd3_diffusers_config())


@pytest.fixture(scope="module")
def sd3_split(tmp_path_factory) -> dict:
    """The same weights as separate files: bare transformer (prefix-less), clip_l, clip_g, t5, vae."""
    return write_sd3_files(tmp_path_factory.mktemp("sd3_split"), sd3_diffusers_config(), full=False)


def load(cfg: dict, dtype: torch.dtype = torch.float32) -> SD3Model:
    return load_sd3(ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"}), "cpu", dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def canonical_transformer(path: str):
    """The transformer as diffusers itself reads the original file (convert_sd3_transformer_checkpoint_to_diffusers)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    raw = load_state_dict(Path(path))
    raw = {k: v for k, v in raw.items() if not k.startswith(("text_encoders.", "first_stage_model."))}
    cfg = diffusers_config_from_original({k.removeprefix(PREFIX): tuple(v.shape) for k, v in raw.items()}, path)
    sd = convert_sd3_transformer_checkpoint_to_diffusers(raw)  # pops what it reads
    model = SD3Transformer2DModel(**cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def pipeline(model: SD3Model, transformer=None, t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else model.denoiser,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
        text_encoder=model.clip_l, tokenizer=model.tok_l, text_encoder_2=model.clip_g, tokenizer_2=model.tok_g,
        text_encoder_3=model.t5 if t5 else None, tokenizer_3=model.tok_t5 if t5 else None,
    )


def _inputs(seed: int = 0, b: int = 2, n: int = 93, d: int = 32, pooled: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 16, 8, 12, generator=g), torch.rand(b, generator=g) * 0.8 + 0.1,
            {"context": torch.randn(b, n, d, generator=g), "pooled": torch.randn(b, pooled, generator=g)})


# --- layout and loading ------------------------------------------------------------------------------

REAL = {
    # SD 3.5 Medium / Large transformer configs (diffusers' transformer/config.json of those repos)
    "medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm="rms_norm"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_config_from_real_shapes(name):
    """At SD 3.5 Medium's and Large's real sizes (meta device): the original-layout names the trainer writes are
    the tensors of diffusers' model, the config read back from their shapes is the real config, and every LoRA
    target key names an original weight (incl. Medium's attn2 and the last block's pre-only context stream)."""
    from diffusers import SD3Transformer2DModel

    from trainer.models.sd3 import use_original_modulation_order

    real = REAL[name]
    with torch.device("meta"):
        model = SD3Transformer2DModel(**real)
    original = diffusers_to_original(model.state_dict(), real)
    assert sum(v.numel() for v in original.values()) == sum(v.numel() for v in model.state_dict().values())
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert diffusers_config_from_original(shapes, name) == real
    last = real["num_layers"] - 1
    assert shapes[f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight"][0] == 2 * real["caption_projection_dim"]
    assert not any(k.startswith(f"joint_blocks.{last}.context_block.mlp") for k in shapes)
    sd3 = object.__new__(SD3Model)
    sd3.denoiser = use_original_modulation_order(model)
    keys = [t.key for t in sd3.targets()]
    assert all(f"{k.removeprefix('diffusion_model.')}.weight" in shapes for k in keys)
    per_block = 10 * (last) + 7 + (2 * len(real["dual_attention_layers"]))
    assert len(keys) == per_block
    assert ("diffusion_model.joint_blocks.12.x_block.attn2.qkv" in keys) == (name == "medium")


def test_single_file_matches_diffusers_converter(sd3_full, sd3_split):
    """Our transformer holds what diffusers' own converter reads from the file, except the last context
    modulation, kept in the original (shift, scale) row order; and it computes what diffusers' model computes.
    A bare transformer file (prefix-less) with separate encoder files loads the same model and encoders."""
    model = load(sd3_full)
    theirs = canonical_transformer(sd3_full["name_or_path"])
    ours, ref = model.denoiser.state_dict(), theirs.state_dict()
    assert set(ours) == set(ref)
    reordered = {"transformer_blocks.1.norm1_context.linear.weight", "transformer_blocks.1.norm1_context.linear.bias"}
    for k in ours:
        if k in reordered:
            a, b = ref[k].chunk(2)
            assert torch.equal(ours[k], torch.cat([b, a])), k
        else:
            assert torch.equal(ours[k], ref[k]), k
    cfg = model.denoiser.config
    assert (cfg.num_layers, cfg.attention_head_dim, cfg.num_attention_heads, tuple(cfg.dual_attention_layers),
            cfg.qk_norm, cfg.pos_embed_max_size) == (2, 8, 4, (0,), "rms_norm", 16)
    assert model.vae.config.scaling_factor == 1.5305 and model.vae.config.shift_factor == 0.0609
    noisy, sigmas, cond = _inputs()
    with torch.no_grad():
        assert rel_err(model.predict(noisy, sigmas, cond), theirs(noisy, cond["context"], cond["pooled"],
                                                                     sigmas * 1000).sample) < 1e-6
    split = load(sd3_split)
    for name in ("denoiser", "clip_l", "clip_g", "t5", "vae"):
        sa, sb = getattr(model, name).state_dict(), getattr(split, name).state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name
    # listed in another order, the encoders are still told apart (T5 by its keys, CLIP-L before CLIP-G)
    shuffled = dict(sd3_split, text_encoder_paths=[sd3_split["text_encoder_paths"][i] for i in (2, 0, 1)])
    ca, cb = split.encode_text(["a red cat"]), load(shuffled).encode_text(["a red cat"])
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_scaled_fp8_file_loads_dequantized(sd3_split, tmp_path):
    """ComfyUI's scaled-fp8 layout (fp8 weights, a per-tensor `scale_weight`, the `scaled_fp8` marker): the loaded
    weights are weight * scale; a quantization that is not per-tensor is refused by name."""
    sd = load_state_dict(Path(sd3_split["name_or_path"]))
    key = "joint_blocks.0.x_block.attn.qkv"
    w = sd[f"{key}.weight"]
    scale = w.abs().max() / 448
    q = dict(sd, **{f"{key}.weight": (w / scale).to(torch.float8_e4m3fn), f"{key}.scale_weight": scale.reshape(1),
                    f"{key}.scale_input": torch.ones(1), "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    p = tmp_path / "fp8.safetensors"
    save_safetensors_atomic(q, p)
    got = load(dict(sd3_split, name_or_path=str(p))).denoiser.transformer_blocks[0].attn
    expect = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(torch.cat([got.to_q.weight, got.to_k.weight, got.to_v.weight]), expect)
    assert rel_err(expect, w) < 0.07  # fp8 precision: the scale really was applied
    q[f"{key}.scale_weight"] = torch.ones(3)
    save_safetensors_atomic(q, p)
    with pytest.raises(ModelFileError, match="scale_weight is a quantization this trainer cannot read"):
        load(dict(sd3_split, name_or_path=str(p)))


def test_diffusers_folder_loads_the_same_model(sd3_full, tmp_path):
    """A local diffusers folder written by StableDiffusion3Pipeline.save_pretrained (with diffusers' own
    transformer conversion): the same model and encodings."""
    model = load(sd3_full)
    folder = tmp_path / "sd3_diffusers"
    pipeline(model, transformer=canonical_transformer(sd3_full["name_or_path"])).save_pretrained(str(folder))
    again = load({"name_or_path": str(folder), "t5_max_length": 16})
    for name in ("denoiser", "clip_l", "clip_g", "t5", "vae"):
        sa, sb = getattr(model, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    prompts = ["a red cat", ""]
    ea, eb = model.encode_text(prompts), again.encode_text(prompts)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_wrong_family_and_missing_parts_are_clear(sd3_split, tiny_flux, tmp_path, monkeypatch):
    with pytest.raises(ModelFileError, match="flux checkpoint, but model.arch is 'sd3'"):
        load(dict(sd3_split, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match=r"SD3 needs CLIP-G \(clip_g.safetensors\)"):
        load(dict(sd3_split, text_encoder_paths=sd3_split["text_encoder_paths"][:1]))
    with pytest.raises(ModelFileError, match="model.vae_path: SD3 needs its VAE"):
        load({k: v for k, v in sd3_split.items() if k != "vae_path"})
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ModelFileError, match="no CLIP tokenizer found"):
        load(dict(sd3_split, tokenizer_paths=[]))
    sd = load_state_dict(Path(sd3_split["name_or_path"]))
    del sd["joint_blocks.1.context_block.attn.qkv.bias"]
    broken = tmp_path / "broken.safetensors"
    save_safetensors_atomic(sd, broken)
    with pytest.raises(ModelFileError, match="not a complete SD3 checkpoint.*joint_blocks.1.context_block.attn.qkv.bias"):
        load(dict(sd3_split, name_or_path=str(broken)))


def test_registered_with_demo_and_legacy_flag():
    from trainer.models import registry

    fam = registry.get_family("sd3")
    from trainer.demo import DEMO_WRITERS

    assert fam.load is load_sd3 and "sd3" in DEMO_WRITERS
    job = load_job_dict(job_dict({"name_or_path": "x.safetensors", "is_v3": True}, Path("."), Path(".")))
    assert job.arch == "sd3"


# --- text and sampling against StableDiffusion3Pipeline ---------------------------------------------------

@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_prompt_encoding_matches_pipeline(t5, sd3_full, sd3_split, caplog):
    """encode_text == StableDiffusion3Pipeline.encode_prompt (CLIP penultimate states + T5, pooled projections);
    without a T5 file, the T5 tokens are zeros of the configured length, as the pipeline's, and a log line says so."""
    with caplog.at_level(logging.INFO, logger="trainer"):
        model = load(sd3_full if t5 else dict(sd3_split, text_encoder_paths=sd3_split["text_encoder_paths"][:2]))
    assert ("no T5-XXL given" in caplog.text) != t5
    pipe = pipeline(model, t5=t5)
    prompts = ["a red cat on a blue background", "sks, a dog", ""]
    ours = model.encode_text(prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    assert ours["context"].shape == (3, 77 + 16, 32) and ours["pooled"].shape == (3, 32)
    assert rel_err(ours["context"], embeds) < 1e-6 and rel_err(ours["pooled"], pooled) < 1e-6
    assert torch.equal(ours["context"][:, 77:] == 0, torch.full((3, 16, 32), not t5))
    assert torch.equal(ours["context"][:, :77, 32:], torch.zeros(3, 77, 0))  # CLIP 16 + 16 fill T5's width 32


def test_sigmas_follow_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = object.__new__(SD3Model)
    for steps in (1, 4, 28):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(steps)
        torch.testing.assert_close(model.sample_sigmas(steps, (1, 16, 8, 8)), sched.sigmas.float(), rtol=0, atol=1e-6)


def test_sampler_matches_sd3_pipeline(sd3_full):
    """Same model, embeddings, initial noise and steps: our Euler sampler with CFG == StableDiffusion3Pipeline with
    FlowMatchEulerDiscreteScheduler(shift=3); decoded images too."""
    model = load(sd3_full)
    pipe = pipeline(model)
    cond, neg = model.encode_text(["a red circle on a blue background"]), model.encode_text(["blurry"])
    noise = initial_noise(model, 48, 32, seed=3)
    steps, scale = 4, 4.5
    ours = denoise(model, noise, cond, neg, steps, scale)
    h, w = noise.shape[-2:]
    theirs = pipe(
        prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=neg["context"], negative_pooled_prompt_embeds=neg["pooled"],
        latents=noise.clone(), height=h * 2, width=w * 2, num_inference_steps=steps, guidance_scale=scale,
        output_type="latent",
    ).images
    err = rel_err(ours, theirs)
    print(f"sampler vs StableDiffusion3Pipeline: rel err {err:.2e}")
    assert err < 1e-3
    assert rel_err(denoise(model, noise, cond, None, steps, scale), ours) > 1e-3  # CFG really is applied
    img = model.decode(ours)
    ref = model.vae.decode(theirs / model.vae.config.scaling_factor + model.vae.config.shift_factor).sample
    assert rel_err(img, ref.clamp(-1, 1)) < 1e-3


# --- training ------------------------------------------------------------------------------------------

def test_gradient_checkpointing_same_gradients(sd3_full):
    from trainer.networks.network import Network

    model = load(sd3_full)
    assert len(model.repeated_blocks()) == 2
    net = Network(model.targets(), "lora", rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.attach()
    noisy, sigmas, cond = _inputs(seed=1)

    def grads():
        net.zero_grad()
        model.predict(noisy, sigmas, cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(1.0)
    checkpointed = grads()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain, checkpointed))


def diffusers_lora(tensors: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI-keyed LoRA file in diffusers' SD3 LoRA format (transformer.<module>.lora_A/B), with the layout
    knowledge taken from diffusers' own single-file converter: each LoRA's scaled up matrix, tagged with a column
    holding its index, stands in for the weight it adapts; the converter splits fused qkv and reorders the last
    context modulation as it does for weights, and the tag says whose down matrix goes with each piece."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    keys = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    downs, fake, rank = {}, dict(original), None
    for i, key in enumerate(keys):
        down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
        rank = down.shape[0]
        up = up * float(tensors[f"{key}.alpha"]) / rank  # diffusers' SD3 loader takes no alphas
        tag = 1000.5 + i
        downs[tag] = down
        fake[key.removeprefix("diffusion_model.") + ".weight"] = torch.cat([up, torch.full((up.shape[0], 1), tag)], 1)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(fake)
    out = {}
    for k, t in converted.items():
        if t.dim() == 2 and t.shape[1] == rank + 1 and float(t[0, -1]) in downs and bool((t[:, -1] == t[0, -1]).all()):
            module = k.removesuffix(".weight")
            out[f"transformer.{module}.lora_A.weight"] = downs[float(t[0, -1])]
            out[f"transformer.{module}.lora_B.weight"] = t[:, :rank].contiguous()
    assert len(out) == 2 * sum(3 if k.endswith("qkv") else 1 for k in keys)  # every piece found
    return out


def test_training_run_and_lora_in_diffusers(sd3_full, tmp_path):
    """A short run (shifted timesteps, linear_timesteps weighting, cached embeddings, samples with CFG); the saved
    file carries ComfyUI's SD3 keys, and, read by diffusers' SD3 LoRA loader into diffusers' own model of the
    base file, reproduces the trained model's outputs."""
    from diffusers import StableDiffusion3Pipeline

    from trainer.job import build_trainer

    images = make_images(tmp_path / "data", n=2)
    d = job_dict(sd3_full, images, tmp_path / "out", steps=3, lr=5e-2, cache_text_embeddings=True,
                 timestep_type="shift", linear_timesteps=True)
    p = d["config"]["process"][0]
    p["sample"].update(sample_every=3, neg="blurry")
    trainer = build_trainer(load_job_dict(d), report=lambda _m: None)
    trainer.train()
    run = tmp_path / "out" / "run"
    assert sorted(x.name for x in (run / "samples").glob("*.png")) == ["000000000_00.png", "000000003_00.png"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in metrics)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # make every update visibly nonzero: the check is about the file
        for a in trainer.network.adapters.values():
            a.lora_up.add_(torch.randn(a.lora_up.shape, generator=g) * 0.05)
    trainer.save(final=True)
    lora_file = run / "run.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert md["modelspec.architecture"] == "stable-diffusion-v3.5-medium/lora"
    modules = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.removesuffix(".alpha") for k in keys}
    b0, b1 = "diffusion_model.joint_blocks.0.", "diffusion_model.joint_blocks.1."
    expected = {b0 + n for n in ("x_block.attn.qkv", "x_block.attn.proj", "x_block.mlp.fc1", "x_block.mlp.fc2",
                                 "x_block.adaLN_modulation.1", "x_block.attn2.qkv", "x_block.attn2.proj",
                                 "context_block.attn.qkv", "context_block.attn.proj", "context_block.mlp.fc1",
                                 "context_block.mlp.fc2", "context_block.adaLN_modulation.1")}
    expected |= {b1 + n for n in ("x_block.attn.qkv", "x_block.attn.proj", "x_block.mlp.fc1", "x_block.mlp.fc2",
                                  "x_block.adaLN_modulation.1", "context_block.attn.qkv",
                                  "context_block.adaLN_modulation.1")}
    assert modules == expected

    model = trainer.model
    g = torch.Generator().manual_seed(0)
    noisy, sigmas = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.55])
    cond = {"context": torch.randn(1, 93, 32, generator=g), "pooled": torch.randn(1, 32, generator=g)}
    trainer.network.eval()
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
        trainer.network.detach()
        base = model.predict(noisy, sigmas, cond)
    assert rel_err(ours, base) > 1e-3

    fresh = canonical_transformer(sd3_full["name_or_path"])
    original = load_state_dict(Path(sd3_full["name_or_path"]), prefix=PREFIX)
    pipe = StableDiffusion3Pipeline(transformer=fresh, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(diffusers_lora(tensors, original))
    with torch.no_grad():
        theirs = fresh(noisy, cond["context"], cond["pooled"], sigmas * 1000).sample
    err = rel_err(theirs, ours)
    print(f"trained LoRA vs diffusers' SD3 LoRA loader: rel err {err:.2e}")
    assert err < 1e-4


def test_demo_runs(tmp_path, capsys):
    """`python -m trainer demo --arch sd3`, through the CLI's own entry (in this process: the imports are paid)."""
    from trainer.cli import main

    out = tmp_path / "demo"
    log = logging.getLogger("trainer")
    saved = (log.handlers[:], log.level, log.propagate)
    try:
        assert main(["demo", "--arch", "sd3", "--out", str(out), "--steps", "2"]) == 0
    finally:  # the CLI sets up the trainer's logging for a terminal; later tests capture it their way
        log.handlers[:], log.level, log.propagate = saved
    assert "LoRA:" in capsys.readouterr().out
    run = out / "output" / "demo_sd3_lora"
    assert (run / "demo_sd3_lora.safetensors").exists() and len(list((run / "samples").glob("*.png"))) == 6
    with safe_open(str(out / "models" / "sd3_demo_transformer.safetensors"), "pt") as f:
        # what ComfyUI's detection reads: width 64 x depth in heads of 64, 16 channels, qk-norm, attn2
        assert f.get_slice("x_embedder.proj.weight").get_shape() == [128, 16, 2, 2]
        assert f.get_slice("joint_blocks.0.context_block.attn.ln_q.weight").get_shape() == [64]
        assert "joint_blocks.0.x_block.attn2.qkv.weight" in f.keys() and "joint_blocks.2.x_block.attn.qkv.weight" not in f.keys()
