"""SDXL family: layouts, loading, prompt encoding and sampling against diffusers' StableDiffusionXLPipeline,
the objective, training, and saved networks read by diffusers' own SDXL LoRA loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import job_dict, make_images, quiet, run_through_and_resumed
from sdxl_helpers import comfy_to_kohya, euler_scheduler, load, pipeline, rel_err, write_tiny_sdxl
from trainer.config import load_job_dict
from trainer.errors import ConfigError, ModelFileError, UserError
from trainer.fileio import save_safetensors_atomic
from trainer.job import build_trainer, run_job
from trainer.models.files import load_state_dict
from trainer.sampling import denoise, initial_noise


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_full(tmp_path_factory) -> dict:
    """One ComfyUI-style checkpoint: UNet + CLIP-L + OpenCLIP-G + VAE (epsilon)."""
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl_full"))


@pytest.fixture(scope="module")
def sdxl_split(tmp_path_factory) -> dict:
    """The same weights as separate files: bare UNet, clip_l, clip_g (transformers layout), VAE."""
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl_split"), full=False)


@pytest.fixture(scope="module")
def sdxl_vpred(tmp_path_factory) -> dict:
    """A v-prediction checkpoint, marked as ComfyUI detects it (a `v_pred` key)."""
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl_v"), v_pred=True, seed=12)


# --- layout -----------------------------------------------------------------------------------------

def test_layout_at_real_size_matches_diffusers_converter():
    """At SDXL's real config (on the meta device, each tensor tagged by its index): our LDM names, read back
    by diffusers' own convert_ldm_unet_checkpoint, land on the same tensors; the config derived from the LDM
    shapes is SDXL base's config; and ComfyUI's names for the first LoRA targets exist."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from trainer.models.sdxl_layout import diffusers_to_ldm, ldm_to_diffusers, unet_config_from_ldm

    real = dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        model = UNet2DConditionModel(**real)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tagged = {k: torch.tensor(float(i)) for i, k in enumerate(shapes)}
    ldm = diffusers_to_ldm(tagged, model.config)
    assert len(ldm) == len(shapes) == 1680
    for k in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.8.1.transformer_blocks.9.ff.net.2.bias",
              "middle_block.1.proj_out.weight", "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight",
              "input_blocks.3.0.op.weight", "output_blocks.8.0.skip_connection.weight", "label_emb.0.2.weight",
              "out.2.weight", "time_embed.0.weight"):
        assert k in ldm, k
    theirs = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, dict(model.config))
    assert set(theirs) == set(shapes)
    assert all(float(theirs[k]) == float(tagged[k]) for k in shapes)

    index = {float(v): k for k, v in tagged.items()}
    ldm_shapes = {k: shapes[index[float(v)]] for k, v in ldm.items()}
    cfg = unet_config_from_ldm(ldm_shapes, "sdxl")
    for key, value in real.items():
        got = cfg[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    back = ldm_to_diffusers(dict(ldm), cfg, set(shapes), "sdxl")
    assert all(float(back[k]) == float(tagged[k]) for k in shapes)


def test_single_file_weights_match_diffusers_converter(sdxl_full):
    """The tiny checkpoint's UNet, converted by diffusers' convert_ldm_unet_checkpoint, is what we loaded."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = load(sdxl_full)
    raw = load_state_dict(Path(sdxl_full["name_or_path"]))
    theirs = convert_ldm_unet_checkpoint(raw, dict(model.denoiser.config))
    ours = model.denoiser.state_dict()
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    assert list(model.denoiser.config.block_out_channels) == [32, 64, 128]
    assert list(model.denoiser.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert model.vae.config.scaling_factor == 0.13025 and not model.v_pred


def test_full_checkpoint_equals_split_files(sdxl_full, sdxl_split):
    """A full checkpoint (OpenCLIP-G, VAE under first_stage_model.) and the same weights as ComfyUI's separate
    files (bare UNet, clip_l, clip_g in transformers layout, vae) load to the same modules."""
    a, b = load(sdxl_full), load(sdxl_split)
    for name in ("denoiser", "clip_l", "clip_g", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}: {k}"
    prompts = ["a red cat", ""]
    ca, cb = a.encode_text(prompts), b.encode_text(prompts)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # listed the other way round, the encoders are still told apart
    c = load(dict(sdxl_split, text_encoder_paths=sdxl_split["text_encoder_paths"][::-1])).encode_text(prompts)
    assert all(torch.equal(ca[k], c[k]) for k in ca)


def test_diffusers_folder_loads(sdxl_vpred, tmp_path):
    """A local diffusers folder (model_index.json): the same model, v-prediction read from its scheduler."""
    model = load(sdxl_vpred)
    assert model.v_pred
    pipe = pipeline(model)
    folder = tmp_path / "sdxl_diffusers"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    again = load({"arch": "sdxl", "name_or_path": str(folder)})
    assert again.v_pred and type(again.objective).__name__ == "VObjective"
    for name in ("denoiser", "clip_l", "clip_g", "vae"):
        sa, sb = getattr(model, name).state_dict(), getattr(again, name).state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}: {k}"
    assert again.encode_text(["a cat"])["pooled"].equal(model.encode_text(["a cat"])["pooled"])


def test_wrong_family_and_missing_parts_are_clear(tmp_path, sdxl_split, tiny_flux):
    with pytest.raises(ModelFileError, match="flux checkpoint, but model.arch is 'sdxl'"):
        load(dict(sdxl_split, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match=r"SDXL needs CLIP-G \(clip_g.safetensors\)"):
        load(dict(sdxl_split, text_encoder_paths=sdxl_split["text_encoder_paths"][:1]))
    with pytest.raises(ModelFileError, match="model.vae_path: SDXL needs its VAE"):
        load({k: v for k, v in sdxl_split.items() if k != "vae_path"})
    unet = load_state_dict(Path(sdxl_split["name_or_path"]))
    unet.pop("middle_block.1.transformer_blocks.0.attn2.to_v.weight")
    p = tmp_path / "broken.safetensors"
    save_safetensors_atomic(unet, p)
    with pytest.raises(ModelFileError, match="incomplete SDXL UNet"):
        load(dict(sdxl_split, name_or_path=str(p)))


# --- encoding and sampling against the pipeline -----------------------------------------------------

def test_prompt_encoding_matches_pipeline(sdxl_full):
    model = load(sdxl_full)
    pipe = pipeline(model)
    prompts = ["a red cat on a blue background", "sks, a dog", ""]
    ours = model.encode_text(prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours["crossattn"].shape == (3, 77, 96) and ours["pooled"].shape == (3, 32)
    assert rel_err(ours["crossattn"], embeds) < 1e-6
    assert rel_err(ours["pooled"], pooled) < 1e-6


@pytest.mark.parametrize("variant", ["eps", "v"])
def test_sampler_matches_sdxl_pipeline(variant, sdxl_full, sdxl_vpred):
    """Our Euler over k-diffusion sigmas == StableDiffusionXLPipeline + EulerDiscreteScheduler ("leading"),
    with classifier-free guidance against a negative prompt, for the same noise and embeddings."""
    model = load(sdxl_full if variant == "eps" else sdxl_vpred)
    pipe = pipeline(model)
    cond, neg = model.encode_text(["a red circle"]), model.encode_text(["blurry"])
    noise = initial_noise(model, 32, 24, seed=3)
    steps, guidance = 5, 4.0
    ours = denoise(model, noise, cond, neg, steps, guidance)
    h, w = noise.shape[-2:]
    theirs = pipe(
        prompt_embeds=cond["crossattn"], pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=neg["crossattn"], negative_pooled_prompt_embeds=neg["pooled"],
        latents=noise.clone(), height=h * model.vae_scale, width=w * model.vae_scale,
        num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
    ).images
    assert rel_err(ours, theirs) < 1e-3
    img = model.decode(ours)
    ref = model.vae.decode(theirs / model.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert rel_err(img, ref) < 1e-3


def test_schedule_and_objective_match_diffusers():
    """Sigmas of EulerDiscreteScheduler; noising and v target of DDPMScheduler; min-SNR as diffusers' recipe."""
    from diffusers import DDPMScheduler

    from trainer.models.objectives import EpsObjective
    from trainer.models.objectives import VObjective
    from trainer.models.sdxl import SDXLModel, ddpm_sigmas

    model = object.__new__(SDXLModel)
    model.sigma_table = ddpm_sigmas()
    model._log_sigmas = model.sigma_table.double().log()
    for steps in (1, 4, 20, 30):
        sched = euler_scheduler()
        sched.set_timesteps(steps)
        torch.testing.assert_close(model.sample_sigmas(steps, (1, 4, 8, 8)), sched.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(model.sigma_to_t(sched.sigmas[:-1]), sched.timesteps, rtol=0, atol=2e-3)

    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    s = model.sigma_table[t]
    c_in = (1 / (s**2 + 1).sqrt()).view(-1, 1, 1, 1)
    eps, v = EpsObjective(), VObjective()
    torch.testing.assert_close(eps.add_noise(x0, n, s) * c_in, ddpm.add_noise(x0, n, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.target(x0, n, s), ddpm.get_velocity(x0, n, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(eps.target(x0, n, s), n)
    # min-SNR-gamma (Hang et al.; diffusers' train_text_to_image recipe): eps min(snr, g) / snr, v min(snr, g) / (snr + 1)
    abar = ddpm.alphas_cumprod[t]
    snr = abar / (1 - abar)
    torch.testing.assert_close(eps.min_snr_weights(s, 5.0), torch.clamp(snr, max=5.0) / snr, rtol=1e-4, atol=0)
    torch.testing.assert_close(v.min_snr_weights(s, 5.0), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-4, atol=0)
    # the sampler's derivative from v is eps
    torch.testing.assert_close(v.derivative(eps.add_noise(x0, n, s[2:3]), v.target(x0, n, s[2:3]), s[2]), n,
                               rtol=1e-4, atol=1e-4)


# --- training -----------------------------------------------------------------------------------------

def test_training_run_saves_comfyui_keys(sdxl_full, images, tmp_path):
    job = load_job_dict(job_dict(sdxl_full, images, tmp_path / "out", steps=3, cache_text_embeddings=True,
                                 snr_gamma=5.0, noise_offset=0.05))
    state = run_job(job, report=quiet)
    run = tmp_path / "out" / "run"
    assert state.step == 3 and all(torch.isfinite(torch.tensor(state.losses)))
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert len(list((run / "samples").glob("*.png"))) == 2
    from safetensors import safe_open

    with safe_open(str(run / "run.safetensors"), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in keys
    assert "diffusion_model.output_blocks.3.1.proj_in.alpha" in keys
    assert "diffusion_model.middle_block.1.transformer_blocks.1.ff.net.0.proj.lora_up.weight" in keys
    assert not any("in_layers" in k for k in keys)  # conv layers only with network.conv / locon
    # every key names a weight of the UNet file, as ComfyUI's LoRA loader maps them
    unet = load_state_dict(Path(sdxl_full["name_or_path"]), prefix="model.diffusion_model.")
    for k in keys:
        module = k[len("diffusion_model."):].rsplit(".lora_", 1)[0].removesuffix(".alpha")
        assert f"{module}.weight" in unet, k


def _fixed_batch_loss(trainer, latents, cond, noise, sigmas) -> float:
    model, obj = trainer.model, trainer.model.objective
    with torch.no_grad():
        pred = model.predict(obj.add_noise(latents, noise, sigmas), sigmas, cond).float()
        return float(((pred - obj.target(latents, noise, sigmas)) ** 2).mean())


@pytest.mark.parametrize("variant", ["eps", "v"])
def test_loss_decreases_on_fixed_batch(variant, sdxl_full, sdxl_vpred, tmp_path):
    cfg = sdxl_full if variant == "eps" else sdxl_vpred
    data = make_images(tmp_path / "data", n=1)
    d = job_dict(cfg, data, tmp_path / "out", steps=10, lr=1e-2, cache_text_embeddings=True)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert type(trainer.model.objective).__name__ == ("VObjective" if variant == "v" else "EpsObjective")
    ds = trainer.datasets[0]
    latents = trainer.latents.get(0, ds.entries[0], trainer.model)[None].float()
    cond = trainer.texts.get(ds.media[0].caption)
    cond = {k: v[None] for k, v in cond.items()}
    g = torch.Generator().manual_seed(1)
    latents = latents.expand(8, -1, -1, -1)
    cond = {k: v.expand(8, *v.shape[1:]) for k, v in cond.items()}
    noise = torch.randn(latents.shape, generator=g)
    sigmas = trainer.model.sigma_table[torch.linspace(50, 950, 8).long()]
    before = _fixed_batch_loss(trainer, latents, cond, noise, sigmas)
    trainer.train()
    after = _fixed_batch_loss(trainer, latents, cond, noise, sigmas)
    assert all(torch.isfinite(torch.tensor(trainer.state.losses)))
    assert after < 0.95 * before, (before, after)


# --- saved networks in an independent loader ------------------------------------------------------------

def _trained_network(sdxl_full, images, tmp_path, conv: bool):
    d = job_dict(sdxl_full, images, tmp_path / "out", steps=2, lr=5e-2)
    p = d["config"]["process"][0]
    p["train"]["disable_sampling"] = True
    if conv:
        p["network"].update(type="locon", conv=4, conv_alpha=2)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train()
    # make every update visibly nonzero (2 steps leave lora_up small): the check is about the file
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in trainer.network.adapters.values():
            a.lora_up.add_(torch.randn(a.lora_up.shape, generator=g) * 0.05)
    trainer.save(final=True)
    return trainer, tmp_path / "out" / "run" / "run.safetensors"


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_saved_network_reproduces_outputs_in_diffusers(conv, sdxl_full, images, tmp_path):
    """The file alone, read by diffusers' SDXL LoRA loader (kohya/ComfyUI LDM names) into a fresh UNet loaded
    by diffusers' own single-file converter, gives the trained model's outputs."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    trainer, lora_file = _trained_network(sdxl_full, images, tmp_path, conv)
    model = trainer.model
    tensors = load_file(str(lora_file))
    assert any(".in_layers.2." in k for k in tensors) == conv
    assert all(k.startswith("diffusion_model.") for k in tensors)

    g = torch.Generator().manual_seed(0)
    noisy, sigmas = torch.randn(1, 4, 16, 16, generator=g) * 3, torch.tensor([2.5])
    cond = model.encode_text(["sks, a red circle"])
    trainer.network.eval()
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
        trainer.network.detach()
        base = model.predict(noisy, sigmas, cond)
    assert rel_err(ours, base) > 1e-3  # the network changes the output

    raw = load_state_dict(Path(sdxl_full["name_or_path"]))
    fresh = UNet2DConditionModel(**dict(model.denoiser.config))
    fresh.load_state_dict(convert_ldm_unet_checkpoint(raw, dict(model.denoiser.config)))
    pipe = pipeline(model, unet=fresh)
    # diffusers' SDXL loader reads kohya's spelling of the LDM names, not ComfyUI's `diffusion_model.` one
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipeline(model, unet=UNet2DConditionModel(**dict(model.denoiser.config))).load_lora_weights(dict(tensors))
    pipe.load_lora_weights(comfy_to_kohya(tensors))
    trainer.model.denoiser = fresh
    with torch.no_grad():
        theirs = model.predict(noisy, sigmas, cond)
    assert rel_err(theirs, ours) < 1e-4


def test_demo_runs(tmp_path):
    out = tmp_path / "demo"
    # one step: the demo UNet is the 283M one ComfyUI detects as SDXL (tests/integration/...demo_detection)
    cmd = [sys.executable, "-m", "trainer", "demo", "--arch", "sdxl", "--out", str(out), "--steps", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "output" / "demo_sdxl_lora"
    assert (run / "demo_sdxl_lora.safetensors").exists()
    assert len(list((run / "samples").glob("*.png"))) == 4  # before training and at step 1, two prompts


def test_gradient_checkpointing_same_gradients(sdxl_full):
    """Checkpointing every resnet and transformer block leaves the network's gradients unchanged."""
    from trainer.networks.network import Network

    model = load(sdxl_full)
    model.denoiser.requires_grad_(False)
    # resnets: 3 levels x 2 down, 2 mid, 3 x 3 up; transformer blocks: 2 x 1 + 2 x 2 down, 2 mid, 3 x 2 + 3 x 1 up
    assert len(model.repeated_blocks()) == (6 + 2 + 9) + (6 + 2 + 9)
    net = Network(model.targets(), "locon", rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.attach()
    x, s = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.5, 5.0])
    cond = model.encode_text(["a cat", "a dog"])

    def grads():
        net.zero_grad()
        model.predict(x, s, cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(1.0)
    checkpointed = grads()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain, checkpointed))


# --- text-encoder training (train.train_text_encoder) ------------------------------------------------------

def _te_job(cfg: dict, data: Path, out: Path, **train) -> dict:
    d = job_dict(cfg, data, out, train_text_encoder=True, **train)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    return d


def test_text_encoder_targets_are_comfyui_keys(sdxl_full):
    """Both CLIPs' q/k/v/out and fc1/fc2 of every layer, under ComfyUI's SDXL names (te1 = CLIP-L, te2 = CLIP-G)."""
    model = load(sdxl_full)
    targets = model.text_encoder_targets()
    keys = [t.key for t in targets]
    assert len(keys) == len(set(keys)) == 2 * 2 * 6  # 2 encoders x 2 layers x 6 Linears
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in keys
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in keys
    assert all(t.component == "text_encoder" for t in targets)
    fc1 = next(t for t in targets if t.key == "lora_te2_text_model_encoder_layers_0_mlp_fc1")
    assert (fc1.in_features, fc1.out_features) == (64, 256)


def test_text_encoder_network_reproduced_by_diffusers(sdxl_full, images, tmp_path):
    """A run with train_text_encoder (own text_encoder_lr group): its file, read by diffusers' SDXL LoRA loader
    (kohya's lora_te1_/lora_te2_/lora_unet_ names) into a fresh pipeline, gives our text-encoder outputs (prompt
    embeddings, pooled) and UNet outputs."""
    d = _te_job(sdxl_full, images, tmp_path / "out", steps=2, lr=5e-2, text_encoder_lr=1e-2)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert trainer.network.trains_text_encoders
    assert sorted((g["name"], g["lr"]) for g in trainer.optimizer.param_groups) == [
        ("denoiser", 5e-2), ("text_encoder", 1e-2)]
    model = trainer.model
    prompts = ["sks, a red circle", ""]
    base_cond = model.encode_text(prompts)
    te_before = {k: v.detach().clone() for k, v in trainer.network.state_dict().items() if "lora_te" in k}
    trainer.train()
    # the text encoders' adapters learned through the UNet's loss (lora_up starts at zero)
    assert any(not torch.equal(v, trainer.network.state_dict()[k]) for k, v in te_before.items() if "lora_up" in k)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in trainer.network.adapters.values():
            a.lora_up.add_(torch.randn(a.lora_up.shape, generator=g) * 0.05)
    trainer.save(final=True)
    tensors = load_file(str(tmp_path / "out" / "run" / "run.safetensors"))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)

    trainer.network.eval()
    noisy, sigmas = torch.randn(1, 4, 16, 16, generator=g) * 3, torch.tensor([2.5])
    with torch.no_grad():
        ours_cond = model.encode_text(prompts)
        ours = model.predict(noisy, sigmas, {k: v[:1] for k, v in ours_cond.items()})
    assert rel_err(ours_cond["crossattn"], base_cond["crossattn"]) > 1e-3  # the network changes the encoders
    assert rel_err(ours_cond["pooled"], base_cond["pooled"]) > 1e-3

    fresh = load(sdxl_full)
    pipe = pipeline(fresh)
    unet = {k: v for k, v in tensors.items() if k.startswith("diffusion_model.")}
    te = {k: v for k, v in tensors.items() if not k.startswith("diffusion_model.")}
    pipe.load_lora_weights({**comfy_to_kohya(unet), **te})
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        theirs = fresh.predict(noisy, sigmas, {k: v[:1] for k, v in ours_cond.items()})
    assert rel_err(embeds, ours_cond["crossattn"]) < 1e-4
    assert rel_err(pooled, ours_cond["pooled"]) < 1e-4
    assert rel_err(theirs, ours) < 1e-4


def test_text_encoder_resume_and_pretrained(sdxl_full, tmp_path):
    """Interrupted at step 2 and resumed: the same final file (UNet and text-encoder parts) as a run never stopped;
    the file continues as network.pretrained_lora_path; a te file without train_text_encoder is a clear error."""
    data = make_images(tmp_path / "data", n=3)
    d = _te_job(sdxl_full, data, tmp_path / "a", steps=4, lr=1e-2, text_encoder_lr=5e-3, lr_scheduler="cosine")
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    final = str(tmp_path / "a" / "run" / "run.safetensors")
    d2 = _te_job(sdxl_full, data, tmp_path / "c", steps=1)
    d2["config"]["process"][0]["network"]["pretrained_lora_path"] = final
    again = build_trainer(load_job_dict(d2), report=quiet)
    exported = again.network.export()
    assert exported.keys() == a.keys() and all(torch.equal(exported[k], a[k]) for k in a)
    d3 = job_dict(sdxl_full, data, tmp_path / "d", steps=1)
    d3["config"]["process"][0]["network"]["pretrained_lora_path"] = final
    with pytest.raises(UserError, match="set train.train_text_encoder: true"):
        build_trainer(load_job_dict(d3), report=quiet)


def test_text_encoder_config_errors(sdxl_full, tiny_flux, images, tmp_path):
    with pytest.raises(ConfigError, match="cache_text_embeddings: cannot be true with train.train_text_encoder"):
        load_job_dict(job_dict(sdxl_full, images, tmp_path, train_text_encoder=True, cache_text_embeddings=True))
    with pytest.raises(ConfigError, match="train_text_encoder: not supported for model.arch 'flux'"):
        load_job_dict(job_dict(tiny_flux, images, tmp_path, train_text_encoder=True))
    for arch in ("chroma", "flex1", "flex2", "sd3"):
        cfg = dict(sdxl_full, arch=arch)
        with pytest.raises(ConfigError, match=f"not supported for model.arch '{arch}'"):
            load_job_dict(job_dict(cfg, images, tmp_path, train_text_encoder=True))
    job = load_job_dict(job_dict(sdxl_full, images, tmp_path, text_encoder_lr=1e-5))
    assert any("text_encoder_lr: ignored without train.train_text_encoder" in w for w in job.warnings)


def test_timestep_types_map_to_discrete_timesteps(sdxl_full):
    """train.timestep_type on SDXL: unset / linear uniform over 0..999; sigmoid logit-normal over t / 1000
    (dense in the middle); shift toward noise. Every sigma is one of the DDPM table's."""
    model = load(sdxl_full)
    n = 20000

    def timesteps(kind):
        s = model.train_sigmas(kind, n, torch.Generator().manual_seed(0), (n, 4, 8, 8))
        t = torch.searchsorted(model.sigma_table, s)
        assert torch.equal(model.sigma_table[t], s)
        return t.float()

    uniform, linear = timesteps(None), timesteps("linear")
    assert torch.equal(uniform, linear)
    assert abs(float(uniform.mean()) - 499.5) < 10 and float(uniform.min()) == 0 and float(uniform.max()) == 999
    sig = timesteps("sigmoid")
    assert abs(float(sig.mean()) - 499.5) < 10 and float(sig.std()) < 0.8 * float(uniform.std())
    # logit-normal: P(t < 100) = P(z < logit(0.1)) = Phi(-2.197) = 0.014
    assert abs(float((sig < 100).float().mean()) - 0.014) < 0.005
    shifted = timesteps("shift")
    # u' = 3u / (1 + 2u) over uniform u has mean 1.5 - 0.75 ln 3 = 0.676
    assert abs(float(shifted.mean()) - 675.5) < 10
    assert torch.equal(timesteps("flux_shift"), shifted)


def test_linear_timesteps_weigh_the_ddpm_position(sdxl_full):
    """`linear_timesteps` weights by where a noise level sits on the schedule: for SDXL the DDPM timestep / 999
    (its k-diffusion sigmas reach ~14.6, where a bell over [0, 1] would zero nearly every weight)."""
    from trainer.models.sdxl import ddpm_sigmas
    from trainer.train.timesteps import linear_timestep_weights

    model = load(sdxl_full)
    t = torch.tensor([0, 250, 500, 750, 999])
    pos = model.schedule_position(ddpm_sigmas()[t])
    assert torch.allclose(pos, t / 999, atol=1e-4), pos
    w = linear_timestep_weights(pos)
    assert w[2] == w.max() and w[2] > 1 and w[0] > 0.1 and w[4] > 0.1, w


def test_train_unet_false_trains_only_the_text_encoders(sdxl_full, images, tmp_path):
    """`train_unet: false` with `train_text_encoder: true`: the saved file holds text-encoder keys only, and the
    UNet's output is the base model's (before: the UNet trained anyway)."""
    d = _te_job(sdxl_full, images, tmp_path, steps=1, train_unet=False)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert trainer.network.targets and all(t.component == "text_encoder" for t in trainer.network.targets.values())
    trainer.train()
    keys = load_file(str(tmp_path / "run" / "run.safetensors")).keys()
    assert keys and all(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)
    with pytest.raises(ConfigError, match="train_unet: false with train.train_text_encoder false"):
        load_job_dict(job_dict(sdxl_full, images, tmp_path, train_unet=False))
