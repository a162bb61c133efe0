"""Chroma family: layouts, loading (single file, diffusers folder), prompt encoding and sampling against diffusers'
ChromaPipeline, masking, a training run and its LoRA file in diffusers' own loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import job_dict, make_images, quiet
from trainer.config import ModelConfig, load_job_dict
from trainer.errors import ModelFileError
from trainer.fileio import save_safetensors_atomic
from trainer.demo import tiny
from trainer.demo.chroma import chroma_diffusers_config, chroma_original_state_dict
from trainer.models.chroma import ChromaModel, load_chroma, load_chroma_transformer
from trainer.models.chroma_layout import diffusers_to_original, original_to_diffusers
from trainer.models.files import load_state_dict
from trainer.models.flux import pack_latents, unpack_latents
from trainer.sampling import denoise, initial_noise

TINY = dict(hidden=32, head_dim=16, double=1, single=2, context_dim=32, approximator_hidden=32, approximator_layers=2)


def _perturbed(sd: dict, seed: int) -> dict:
    """Random biases and norm scales (the tiny builder's are zeros and ones), so a bias or scale mapped to the
    wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(sd):
        t = sd[k]
        if t.dim() == 1:
            n = torch.randn(t.shape, generator=g)
            t = (1.0 + 0.1 * n) if k.endswith(".scale") else 0.05 * n
        out[k] = t.to(sd[k].dtype)
    return out


def write_tiny_chroma(folder: Path, seed: int = 4, **over) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tt = tiny.build_tokenizer(folder / "tok_t5", "t5")
    tiny.make_t5_file(folder / "t5.safetensors", len(tt), d_model=TINY["context_dim"])
    tiny.make_vae_file(folder / "ae.safetensors", [32, 32])
    cfg = chroma_diffusers_config(**{**TINY, **over})
    sd = _perturbed(chroma_original_state_dict(cfg, seed, torch.float32), seed + 1)
    save_safetensors_atomic({f"model.diffusion_model.{k}": v for k, v in sd.items()}, folder / "chroma.safetensors")
    return {
        "arch": "chroma",
        "name_or_path": str(folder / "chroma.safetensors"),
        "text_encoder_paths": [str(folder / "t5.safetensors")],
        "vae_path": str(folder / "ae.safetensors"),
        "tokenizer_paths": [str(folder / "tok_t5")],
        "t5_max_length": 12,
    }


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory) -> dict:
    return write_tiny_chroma(tmp_path_factory.mktemp("tiny_chroma"))


def _load(cfg: dict) -> ChromaModel:
    return load_chroma(ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"}), "cpu", torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(seed: int = 0, b: int = 1, h: int = 8, w: int = 8, n: int = 12, d: int = 32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 12, 1][:b])
    keep = torch.arange(n)[None, :] <= lengths[:, None]
    return (torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g) * 0.8 + 0.1,
            {"t5": torch.randn(b, n, d, generator=g), "t5_mask": keep})


# --- layout and loading --------------------------------------------------------------------------

def test_config_from_shapes_and_layout_roundtrip(tiny_chroma):
    model = _load(tiny_chroma).denoiser
    cfg = dict(model.config)
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["approximator_layers"]) == (1, 2, 2)
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["approximator_hidden_dim"]) == (2, 16, 32)
    original = load_state_dict(Path(tiny_chroma["name_or_path"]), prefix="model.diffusion_model.")
    assert "distilled_guidance_layer.norms.0.scale" in original and "final_layer.linear.weight" in original
    assert not any(".img_mod." in k or ".modulation." in k or "adaLN" in k for k in original)
    back = diffusers_to_original(model.state_dict(), cfg)
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    again = original_to_diffusers(dict(original), shapes, cfg, "x")
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_modulation_index_matches_original_at_any_depth(tiny_chroma):
    """The final layer's modulation comes from index 342/343 as in the original model and ComfyUI (which always
    compute 344 vectors), not from the end of diffusers' depth-sized index; the blocks' indices are unchanged."""
    from diffusers.models.embeddings import get_timestep_embedding

    m = _load(tiny_chroma).denoiser
    proj = m.time_text_embed.mod_proj
    n = 3 * 2 + 12 * 1  # the tiny model's blocks
    assert proj.shape == (n + 2, 32)
    ref = get_timestep_embedding(torch.arange(344) * 1000, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(proj, torch.cat([ref[:n], ref[342:]]), rtol=0, atol=0)


def _write_diffusers_folder(model: ChromaModel, folder: Path) -> None:
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    ChromaPipeline(scheduler=sched, vae=model.vae, text_encoder=model.t5, tokenizer=model.t5_tokenizer,
                   transformer=model.denoiser).save_pretrained(str(folder))


def test_diffusers_folder_loads_the_same_model(tiny_chroma, tmp_path):
    single = _load(tiny_chroma)
    folder = tmp_path / "chroma_diffusers"
    _write_diffusers_folder(single, folder)
    assert (folder / "model_index.json").exists() and (folder / "text_encoder").is_dir()
    from_folder = load_chroma(ModelConfig(name_or_path=str(folder), t5_max_length=12), "cpu", torch.float32)
    assert from_folder.dynamic_shift
    noisy, sigmas, cond = _inputs(b=2)
    with torch.no_grad():
        a = single.predict(noisy, sigmas, cond)
        b = from_folder.predict(noisy, sigmas, cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    prompts = ["a red cat", ""]
    ea, eb = single.encode_text(prompts), from_folder.encode_text(prompts)
    assert torch.equal(ea["t5"], eb["t5"]) and torch.equal(ea["t5_mask"], eb["t5_mask"])


def test_wrong_family_checkpoint(tiny_chroma, tiny_flux):
    cfg = dict(tiny_chroma, name_or_path=tiny_flux["name_or_path"])
    with pytest.raises(ModelFileError, match="flux checkpoint, but model.arch is 'chroma'"):
        _load(cfg)


def test_missing_t5_is_named(tiny_chroma, tiny_flux):
    with pytest.raises(ModelFileError, match="Chroma needs T5-XXL"):
        _load(dict(tiny_chroma, text_encoder_paths=[]))
    # a CLIP listed (a Flux config reused) is ignored, not mistaken for the T5
    m = _load(dict(tiny_chroma, text_encoder_paths=[tiny_flux["text_encoder_paths"][0], *tiny_chroma["text_encoder_paths"]]))
    assert m.t5 is not None


def test_incomplete_checkpoint_is_clear(tiny_chroma, tmp_path):
    sd = load_state_dict(Path(tiny_chroma["name_or_path"]))
    del sd["model.diffusion_model.single_blocks.1.linear2.weight"]
    p = tmp_path / "broken.safetensors"
    save_safetensors_atomic(sd, p)
    with pytest.raises(ModelFileError, match="not a complete Chroma checkpoint.*single_blocks.1.linear2.weight"):
        load_chroma_transformer(p, torch.float32)


def test_registered_with_demo():
    from trainer.models import registry

    fam = registry.get_family("chroma")
    from trainer.demo import DEMO_WRITERS

    assert fam.load is load_chroma and "chroma" in DEMO_WRITERS


# --- text, masking, sampling against ChromaPipeline ----------------------------------------------

def _pipeline(model: ChromaModel):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(scheduler=sched, vae=model.vae, text_encoder=model.t5, tokenizer=model.t5_tokenizer,
                          transformer=model.denoiser)


def test_prompt_encoding_matches_pipeline(tiny_chroma):
    model = _load(tiny_chroma)
    pipe = _pipeline(model)
    prompts = ["a red cat on a blue background", "sks", "one two three four five six seven eight nine ten eleven twelve"]
    negs = ["", "blurry dark", "a"]
    ours, ours_neg = model.encode_text(prompts), model.encode_text(negs)
    embeds, _, mask, neg_embeds, _, neg_mask = pipe.encode_prompt(
        prompt=prompts, negative_prompt=negs, do_classifier_free_guidance=True, max_sequence_length=model.t5_max_length)
    assert rel_err(ours["t5"], embeds) < 1e-6 and rel_err(ours_neg["t5"], neg_embeds) < 1e-6
    # the pipeline returns its mask as 0/1 floats; the kept positions are the same
    assert torch.equal(ours["t5_mask"], mask.bool()) and torch.equal(ours_neg["t5_mask"], neg_mask.bool())
    # the prompt's tokens and one padding token; a prompt that fills the window keeps everything
    assert ours["t5_mask"].sum(dim=1).tolist() == [9, 3, 12]


def test_masked_tokens_change_nothing_and_trimming_is_exact(tiny_chroma):
    """predict trims the text to the kept prefix; that equals the transformer run on the full padded sequence with
    the boolean mask (as ChromaPipeline passes it), and masked tokens have no influence."""
    model = _load(tiny_chroma)
    noisy, sigmas, cond = _inputs(seed=1, b=3)
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
        b, _, h, w = noisy.shape
        full_mask = torch.cat([cond["t5_mask"], torch.ones(b, h * w // 4, dtype=torch.bool)], dim=1)
        from trainer.models.flux import image_ids

        ref = model.denoiser(
            hidden_states=pack_latents(noisy), encoder_hidden_states=cond["t5"], timestep=sigmas,
            img_ids=image_ids(h, w, "cpu", torch.float32), txt_ids=torch.zeros(cond["t5"].shape[1], 3),
            attention_mask=full_mask, return_dict=False)[0]
        ref = unpack_latents(ref, h, w)
        junk = dict(cond, t5=torch.where(cond["t5_mask"][..., None], cond["t5"], torch.randn_like(cond["t5"]) * 10))
        changed = model.predict(noisy, sigmas, junk)
        single = model.predict(noisy[:1], sigmas[:1], {k: v[:1] for k, v in cond.items()})
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(changed, ours) < 1e-5
    assert rel_err(single, ours[:1]) < 1e-5  # alone (no mask after trimming) == in a masked batch


def test_sampler_matches_chroma_pipeline(tiny_chroma):
    """Same model, embeddings, initial noise and steps: our sampler (true CFG, Flux's dynamic shift) equals the
    pipeline's. The pipeline gets the boolean mask (its own default float mask is diffusers issue #13619)."""
    model = _load(tiny_chroma)
    pipe = _pipeline(model)
    cond = model.encode_text(["a red circle on a blue background"])
    neg = model.encode_text(["blurry"])
    noise = initial_noise(model, 48, 32, seed=3)
    steps, scale = 4, 4.0
    ours = denoise(model, noise, cond, neg, steps, scale)
    h, w = noise.shape[-2:]
    out = pipe(
        prompt_embeds=cond["t5"], prompt_attention_mask=cond["t5_mask"],
        negative_prompt_embeds=neg["t5"], negative_prompt_attention_mask=neg["t5_mask"],
        latents=pack_latents(noise), height=h * 2, width=w * 2, num_inference_steps=steps, guidance_scale=scale,
        output_type="latent",
    ).images
    theirs = unpack_latents(out, h, w)
    assert rel_err(ours, theirs) < 1e-3
    # CFG really is applied (the negative prompt matters)
    assert rel_err(denoise(model, noise, cond, None, steps, scale), ours) > 1e-3
    img = model.decode(ours)
    ref = model.vae.decode(theirs / model.vae.config.scaling_factor + model.vae.config.shift_factor).sample
    assert rel_err(img, ref.clamp(-1, 1)) < 1e-3


def test_sigmas_follow_the_scheduler(tiny_chroma):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    model = _load(tiny_chroma)
    for shape, steps in (((1, 16, 64, 64), 20), ((1, 16, 128, 96), 7)):
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        seq = (shape[-2] // 2) * (shape[-1] // 2)
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq))
        torch.testing.assert_close(model.sample_sigmas(steps, shape), sched.sigmas.float(), rtol=0, atol=1e-6)


# --- training --------------------------------------------------------------------------------------

def test_gradient_checkpointing_keeps_the_mask(tiny_chroma):
    """Checkpointed blocks get the attention mask too (diffusers' own path drops it for single blocks): the same
    loss and gradients with and without checkpointing, for a batch whose captions differ in length."""
    from trainer.networks.network import Network

    model = _load(tiny_chroma)
    net = Network(model.targets(), "lora", rank=2, alpha=2.0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    net.attach()
    noisy, sigmas, cond = _inputs(seed=2, b=2)

    def grads():
        net.zero_grad()
        loss = model.predict(noisy, sigmas, cond).pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    base_loss, base_grads = grads()
    model.set_gradient_checkpointing(1.0)
    ck_loss, ck_grads = grads()
    model.set_gradient_checkpointing(0.0)
    again_loss, _ = grads()
    torch.testing.assert_close(ck_loss, base_loss)
    for a, b in zip(ck_grads, base_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(again_loss, base_loss)


def _diffusers_prediction(chroma_file: str, lora_file: Path, model: ChromaModel, noisy, sigmas, cond) -> torch.Tensor:
    """A fresh base model with the LoRA file applied by diffusers' own loader (ChromaPipeline.load_lora_weights)."""
    from diffusers import ChromaPipeline

    fresh = load_chroma_transformer(Path(chroma_file), torch.float32)
    pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=fresh)
    pipe.load_lora_weights(str(lora_file))
    trained = model.denoiser
    model.denoiser = fresh
    try:
        with torch.no_grad():
            return model.predict(noisy, sigmas, cond)
    finally:
        model.denoiser = trained


def test_training_run_and_lora_in_diffusers(tiny_chroma, tmp_path):
    """A short run_job on the tiny Chroma; the saved file alone, read by diffusers' Chroma LoRA loader into a fresh
    model, gives the trained outputs. diffusers' converter splits linear1 at Chroma's full width (3072), so this
    tiny run leaves linear1 out; test_lora_full_width_every_target covers it."""
    from trainer.job import build_trainer

    images = make_images(tmp_path / "data")
    d = job_dict(tiny_chroma, images, tmp_path / "out", steps=3, lr=5e-2, cache_text_embeddings=True)
    d["config"]["process"][0]["network"]["network_kwargs"] = {"ignore_if_contains": ["linear1"]}
    d["config"]["process"][0]["sample"]["sample_every"] = 3
    d["config"]["process"][0]["sample"]["neg"] = "blurry"
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train()
    run = tmp_path / "out" / "run"
    assert (run / "run.safetensors").exists() and (run / "run_000000002.safetensors").exists()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["000000000_00.png", "000000003_00.png"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in metrics)
    with safe_open(str(run / "run.safetensors"), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    assert md["ss_base_model_version"] == "chroma"
    # 8 linears per double block, linear2 per single block (linear1 filtered out here), no modulation targets
    expected = {f"diffusion_model.double_blocks.0.{n}" for n in (
        "img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
        "txt_mlp.2")} | {f"diffusion_model.single_blocks.{i}.linear2" for i in range(2)}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys} == expected

    model = trainer.model
    assert all(a.lora_up.abs().max() > 0 for a in trainer.network.adapters.values())
    noisy, sigmas, _ = _inputs(seed=5, b=1)
    if model.t5 is None:  # released after caching the embeddings
        model.t5 = _load(tiny_chroma).t5
    cond = model.encode_text(["sks, a red circle"])
    trainer.network.eval()
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
        trainer.network.detach()
        base = model.predict(noisy, sigmas, cond)
    assert rel_err(ours, base) > 1e-4
    theirs = _diffusers_prediction(tiny_chroma["name_or_path"], run / "run.safetensors", model, noisy, sigmas, cond)
    assert rel_err(theirs, ours) < 1e-4


def test_lora_full_width_every_target(tmp_path):
    """At Chroma's real width (3072; one double and one single block, a small approximator), every target incl.
    the fused linear1, through diffusers' Chroma LoRA loader."""
    from trainer.networks.network import Network

    cfg = chroma_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64,
                                  approximator_hidden=64, approximator_layers=1)
    chroma_file = tmp_path / "chroma.safetensors"
    save_safetensors_atomic(chroma_original_state_dict(cfg, 4, torch.bfloat16), chroma_file)
    model = ChromaModel(load_chroma_transformer(chroma_file, torch.float32), None, None, None, 8,
                        torch.device("cpu"), torch.float32)
    net = Network(model.targets(), "lora", rank=4, alpha=8.0)
    assert len(net.targets) == 10
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    net.attach()
    lora_file = tmp_path / "lora.safetensors"
    save_safetensors_atomic(net.export(torch.float32), lora_file)
    noisy, sigmas = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.4])
    keep = torch.arange(8)[None] <= 4
    cond = {"t5": torch.randn(1, 8, 64, generator=g), "t5_mask": keep}
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
    net.detach()
    theirs = _diffusers_prediction(str(chroma_file), lora_file, model, noisy, sigmas, cond)
    assert rel_err(theirs, ours) < 1e-4


def test_demo_runs_offline(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "trainer", "demo", "--arch", "chroma", "--out", str(out), "--steps", "2"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "output" / "demo_chroma_lora"
    assert (run / "demo_chroma_lora.safetensors").exists() and "LoRA:" in r.stdout
    with safe_open(str(out / "models" / "chroma_demo.safetensors"), "pt") as f:
        # what ComfyUI's detection reads: Flux double-block keys + the approximator; hidden 3072 in heads of 128
        assert f.get_slice("img_in.weight").get_shape() == [3072, 64]
        assert f.get_slice("double_blocks.0.img_attn.norm.key_norm.scale").get_shape() == [128]
        assert f.get_slice("distilled_guidance_layer.in_proj.weight").get_shape() == [5120, 64]
        assert "distilled_guidance_layer.norms.0.scale" in f.keys()
