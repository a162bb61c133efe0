"""Kolors family: loading from the files MZ users keep (diffusers-layout and LDM UNet, ChatGLM3 file and its 8-bit
form, a diffusers folder), prompt encoding and sampling against diffusers' KolorsPipeline, the schedule, training,
saved networks read by diffusers' SDXL LoRA loader, resume, and clear errors for wrong files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import job_dict, make_images, quiet, run_through_and_resumed
from kolors_helpers import TINY_KOLORS, euler_scheduler, load, pipeline, write_tiny_kolors
from sdxl_helpers import comfy_to_kohya, rel_err, write_tiny_sdxl
from trainer.config import load_job_dict
from trainer.errors import ModelFileError
from trainer.fileio import save_safetensors_atomic
from trainer.job import build_trainer, run_job
from trainer.sampling import denoise, initial_noise


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kolors(tmp_path_factory) -> dict:
    """The UNet in diffusers' layout (as Kolors ships it, what the MZ node loads), ChatGLM3, VAE, tokenizer."""
    return write_tiny_kolors(tmp_path_factory.mktemp("kolors"))


@pytest.fixture(scope="module")
def model(kolors):
    return load(kolors)


# --- layout and loading -----------------------------------------------------------------------------

def test_real_size_config_from_diffusers_shapes():
    """At Kolors' real size (meta device): the config read from the diffusers-layout shapes alone is Kolors' own
    (SDXL's UNet, 4096 -> 2048 text projection, 5632 added inputs), and the same from its LDM names."""
    from diffusers import UNet2DConditionModel

    from trainer.models.sdxl_layout import diffusers_to_ldm, unet_config_from_diffusers, unet_config_from_ldm

    real = dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632,
        encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**real)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes["encoder_hid_proj.weight"] == (2048, 4096)
    ldm = diffusers_to_ldm({k: torch.empty(v, device="meta") for k, v in shapes.items()}, unet.config)
    assert "encoder_hid_proj.weight" in ldm and "label_emb.0.0.weight" in ldm
    for cfg in (unet_config_from_diffusers(shapes, "kolors"),
                unet_config_from_ldm({k: tuple(v.shape) for k, v in ldm.items()}, "kolors")):
        for key, value in real.items():
            got = cfg[key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key


def test_layouts_and_folder_load_the_same_model(kolors, model, tmp_path):
    """The LDM-layout file (the MZ checkpoint loader's) and a diffusers folder (KolorsPipeline.save_pretrained) load
    to the same modules as the diffusers-layout file; the UNet is the file's tensors, read without our code."""
    ref = load_file(kolors["name_or_path"])
    ours = model.denoiser.state_dict()
    assert set(ref) == set(ours) and all(torch.equal(ref[k], ours[k]) for k in ref)
    assert model.denoiser.config.encoder_hid_dim == 256 and model.denoiser.config.cross_attention_dim == 64
    ldm = load(write_tiny_kolors(tmp_path / "ldm", layout="ldm"))
    folder = tmp_path / "kolors_diffusers"
    pipeline(model).save_pretrained(str(folder), safe_serialization=True)
    # the UNet as Kolors-diffusers ships it: the fp16 variant's file name only
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.rename(unet_file.with_name("diffusion_pytorch_model.fp16.safetensors"))
    from_folder = load({"arch": "kolors", "name_or_path": str(folder)})
    for other in (ldm, from_folder):
        for name in ("denoiser", "vae", "chatglm"):
            sa, sb = getattr(model, name).state_dict(), getattr(other, name).state_dict()
            assert set(sa) == set(sb), name
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    prompts = ["a red cat", ""]
    a, b = model.encode_text(prompts), from_folder.encode_text(prompts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chatglm_file_loads_as_diffusers_builds_it(kolors, model):
    """Our ChatGLM (config from the shapes, no language-model head) computes what diffusers' ChatGLMModel built from
    the writer's own config and loaded with the whole file computes, through KolorsPipeline.encode_prompt."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    from trainer.demo.kolors import chatglm_config

    cfg = chatglm_config(model.tokenizer.vocab_size, TINY_KOLORS["text_width"], TINY_KOLORS["text_layers"],
                         TINY_KOLORS["ffn"], TINY_KOLORS["groups"])
    ref = ChatGLMModel(ChatGLMConfig(**cfg), empty_init=False)
    ref.load_state_dict(load_file(kolors["text_encoder_paths"][0]))  # every tensor, the head included
    ref.eval().requires_grad_(False)
    assert model.chatglm.output_layer is None and ref.output_layer is not None
    prompts = ["a red circle on a blue background", "sks a dog"]
    theirs, _, pooled, _ = pipeline(model, text_encoder=ref).encode_prompt(prompts, do_classifier_free_guidance=False)
    ours = model.encode_text(prompts)
    assert rel_err(ours["crossattn"], theirs) < 1e-6 and rel_err(ours["pooled"], pooled) < 1e-6


def test_eight_bit_chatglm_is_dequantized(kolors, model, tmp_path):
    """The MZ node's 8-bit file (int8 rows of each attention / MLP Linear with a per-row scale): weight = q * scale."""
    sd = load_file(kolors["text_encoder_paths"][0])
    q8, expected = {}, {}
    for k, w in sd.items():
        if k.startswith("encoder.layers.") and k.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                                           "dense_4h_to_h.weight")):
            scale = (w.abs().amax(dim=-1) / 127).half()  # as the MZ node's QuantizedLinear quantizes
            q = torch.round(w / scale.float()[:, None]).to(torch.int8)
            q8[k], q8[k + "_scale"] = q, scale
            expected[k] = q.float() * scale.float()[:, None]
        else:
            q8[k] = w
    path = tmp_path / "chatglm3-8bit.safetensors"
    save_safetensors_atomic(q8, path)
    m8 = load(dict(kolors, text_encoder_paths=[str(path)]))
    got = m8.chatglm.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    a, b = model.encode_text(["a red cat"]), m8.encode_text(["a red cat"])
    assert rel_err(b["crossattn"], a["crossattn"]) < 0.05  # 8-bit rounding, not a different model

    packed = {k: (v[:, : v.shape[1] // 2].contiguous() if k in expected else v) for k, v in q8.items()}
    save_safetensors_atomic(packed, tmp_path / "chatglm3-4bit.safetensors")
    with pytest.raises(ModelFileError, match="a 4-bit ChatGLM"):
        load(dict(kolors, text_encoder_paths=[str(tmp_path / "chatglm3-4bit.safetensors")]))


def test_wrong_files_are_one_clear_error(kolors, tiny_flux, tmp_path):
    sdxl = write_tiny_sdxl(tmp_path / "sdxl", full=False)
    with pytest.raises(ModelFileError, match="flux checkpoint, but model.arch is 'kolors'"):
        load(dict(kolors, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match="sdxl checkpoint, but model.arch is 'kolors'"):
        load(dict(kolors, name_or_path=sdxl["name_or_path"]))
    from sdxl_helpers import load as load_sdxl

    with pytest.raises(ModelFileError, match="kolors checkpoint, but model.arch is 'sdxl'"):
        load_sdxl(dict(sdxl, name_or_path=kolors["name_or_path"]))
    pickles = tmp_path / "text_encoder"
    pickles.mkdir()
    (pickles / "pytorch_model-00001-of-00007.bin").write_bytes(b"not read")
    with pytest.raises(ModelFileError, match=r"pickle shards \(.bin\), which this trainer never loads"):
        load(dict(kolors, text_encoder_paths=[str(pickles)]))
    with pytest.raises(ModelFileError, match="is not a ChatGLM3 text encoder"):
        load(dict(kolors, text_encoder_paths=[sdxl["text_encoder_paths"][0]]))
    with pytest.raises(ModelFileError, match="Kolors has one text encoder"):
        load(dict(kolors, text_encoder_paths=kolors["text_encoder_paths"] * 2))
    with pytest.raises(ModelFileError, match="Kolors needs ChatGLM3"):
        load({k: v for k, v in kolors.items() if k != "text_encoder_paths"})
    with pytest.raises(ModelFileError, match="no ChatGLM tokenizer found"):
        load(dict(kolors, tokenizer_paths=[str(tmp_path)]))
    with pytest.raises(ModelFileError, match="model.vae_path: Kolors needs its VAE"):
        load({k: v for k, v in kolors.items() if k != "vae_path"})
    wide = write_kolors_other_width(tmp_path / "wide")
    with pytest.raises(ModelFileError, match="ChatGLM width 128 does not match the UNet's text input 256"):
        load(dict(kolors, text_encoder_paths=wide["text_encoder_paths"]))


def write_kolors_other_width(folder: Path) -> dict:
    from trainer.demo.kolors import write_kolors_files

    return write_kolors_files(folder, **dict(TINY_KOLORS, text_width=128))


# --- encoding and sampling against the pipeline -----------------------------------------------------------

def test_prompt_encoding_matches_pipeline(model):
    prompts = ["a red cat on a blue background", "sks a dog", ""]
    ours = model.encode_text(prompts)
    embeds, _, pooled, _ = pipeline(model).encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours["crossattn"].shape == (3, 256, 256) and ours["pooled"].shape == (3, 256)
    assert rel_err(ours["crossattn"], embeds) < 1e-6
    assert rel_err(ours["pooled"], pooled) < 1e-6
    # one prompt alone encodes as it does in a batch (left padding, position ids from the tokenizer)
    alone = model.encode_text(prompts[1:2])
    assert rel_err(alone["crossattn"][0], ours["crossattn"][1]) < 1e-5


def test_sampler_matches_kolors_pipeline(model):
    """Our Euler over k-diffusion sigmas == KolorsPipeline + Kolors' EulerDiscreteScheduler (1100 steps, "leading"),
    with classifier-free guidance against a negative prompt, for the same noise and embeddings."""
    cond, neg = model.encode_text(["a red circle"]), model.encode_text(["blurry"])
    noise = initial_noise(model, 32, 24, seed=3)
    steps, guidance = 5, 4.0
    ours = denoise(model, noise, cond, neg, steps, guidance)
    h, w = noise.shape[-2:]
    theirs = pipeline(model)(
        prompt_embeds=cond["crossattn"], pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=neg["crossattn"], negative_pooled_prompt_embeds=neg["pooled"],
        latents=noise.clone(), height=h * model.vae_scale, width=w * model.vae_scale,
        num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
    ).images
    assert rel_err(ours, theirs) < 1e-3


def test_schedule_and_noising_match_diffusers(model):
    """Sigmas and timesteps of Kolors' EulerDiscreteScheduler; noising of DDPMScheduler over the same betas; training
    timesteps cover 0..1099."""
    from diffusers import DDPMScheduler

    from trainer.models.objectives import EpsObjective

    for steps in (1, 4, 20, 25, 50):
        sched = euler_scheduler()
        sched.set_timesteps(steps)
        torch.testing.assert_close(model.sample_sigmas(steps, (1, 4, 8, 8)), sched.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(model.sigma_to_t(sched.sigmas[:-1]), sched.timesteps, rtol=0, atol=2e-3)
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear", num_train_timesteps=1100)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 700, 1099])
    s = model.sigma_table[t]
    c_in = (1 / (s**2 + 1).sqrt()).view(-1, 1, 1, 1)
    torch.testing.assert_close(EpsObjective().add_noise(x0, n, s) * c_in, ddpm.add_noise(x0, n, t), rtol=1e-5, atol=1e-5)
    drawn = torch.searchsorted(model.sigma_table, model.train_sigmas(None, 20000, torch.Generator().manual_seed(1), ()))
    assert int(drawn.min()) == 0 and int(drawn.max()) == 1099
    torch.testing.assert_close(model.schedule_position(model.sigma_table[t]), t / 1099, rtol=0, atol=1e-4)


# --- training, saved networks, resume ---------------------------------------------------------------------

def test_training_run_saves_comfyui_sdxl_keys(kolors, images, tmp_path):
    job = load_job_dict(job_dict(kolors, images, tmp_path / "out", steps=2, cache_text_embeddings=True))
    state = run_job(job, report=quiet)
    run = tmp_path / "out" / "run"
    assert state.step == 2 and all(torch.isfinite(torch.tensor(state.losses)))
    assert len(list((run / "samples").glob("*.png"))) == 2
    from safetensors import safe_open

    with safe_open(str(run / "run.safetensors"), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    assert md["modelspec.architecture"] == "kolors/lora" and md["eridiffusion.arch"] == "kolors"
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.lora_down.weight" in keys
    assert "diffusion_model.middle_block.1.transformer_blocks.1.ff.net.0.proj.lora_up.weight" in keys
    assert all(k.startswith("diffusion_model.") for k in keys) and not any("encoder_hid_proj" in k for k in keys)


def _trained_network(kolors, images, tmp_path, conv: bool):
    d = job_dict(kolors, images, tmp_path / "out", steps=2, lr=5e-2)
    p = d["config"]["process"][0]
    p["train"]["disable_sampling"] = True
    if conv:
        p["network"].update(type="locon", conv=4, conv_alpha=2)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every update visibly nonzero (2 steps leave lora_up small): the check is about the file
        for a in trainer.network.adapters.values():
            a.lora_up.add_(torch.randn(a.lora_up.shape, generator=g) * 0.05)
    trainer.save(final=True)
    return trainer, tmp_path / "out" / "run" / "run.safetensors"


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_saved_network_reproduces_outputs_in_diffusers(conv, kolors, images, tmp_path):
    """The file alone, read by diffusers' SDXL LoRA loader (kohya's spelling of ComfyUI's LDM names; KolorsPipeline's
    own loader is SD1's and does not map LDM blocks) into a fresh UNet holding the file's tensors, gives the trained
    model's outputs."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    trainer, lora_file = _trained_network(kolors, images, tmp_path, conv)
    model = trainer.model
    tensors = load_file(str(lora_file))
    assert any(".in_layers.2." in k for k in tensors) == conv
    g = torch.Generator().manual_seed(0)
    noisy, sigmas = torch.randn(1, 4, 16, 16, generator=g) * 3, model.sigma_table[640].reshape(1)
    cond = model.encode_text(["sks, a red circle"])
    trainer.network.eval()
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
        trainer.network.detach()
        base = model.predict(noisy, sigmas, cond)
    assert rel_err(ours, base) > 1e-3  # the network changes the output

    fresh = UNet2DConditionModel(**dict(model.denoiser.config))
    fresh.load_state_dict(load_file(kolors["name_or_path"]))
    sdxl = StableDiffusionXLPipeline(vae=model.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=fresh, scheduler=euler_scheduler())
    sdxl.load_lora_weights(comfy_to_kohya(tensors))
    model.denoiser = fresh
    with torch.no_grad():
        theirs = model.predict(noisy, sigmas, cond)
    assert rel_err(theirs, ours) < 1e-4


def test_resume_equals_run_through(kolors, tmp_path):
    """Interrupted at step 2 and resumed: the same final file as a run never stopped."""
    data = make_images(tmp_path / "data", n=3)
    d = job_dict(kolors, data, tmp_path / "a", steps=4, lr=1e-2, lr_scheduler="cosine", cache_text_embeddings=True)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_demo_runs(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "trainer", "demo", "--arch", "kolors", "--out", str(out), "--steps", "1"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"kolors demo, 1 step: {time.perf_counter() - t0:.0f}s")
    run = out / "output" / "demo_kolors_lora"
    assert (run / "demo_kolors_lora.safetensors").exists()
    assert len(list((run / "samples").glob("*.png"))) == 4  # before training and at step 1, two prompts
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
