"""LTX-Video 0.9.x: layouts against diffusers' converters, loading from a Lightricks-style checkpoint, prompt encoding,
sampling against LTXPipeline / LTXImageToVideoPipeline, the image-to-video seam (known latents kept by the sampler,
left out of the loss), saved LoRAs read by diffusers' LTX-Video LoRA loader, and training on clips with resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import job_dict, quiet, run_through_and_resumed
from trainer.config import ModelConfig, load_job_dict
from trainer.demo.ltxv import TINY_VAE, ltxv_diffusers_config, write_ltxv_files
from trainer.demo.videos import make_video_dataset
from trainer.errors import ModelFileError
from trainer.job import build_trainer
from trainer.models.ltxv import load_ltxv, ltxv_sigmas
from trainer.models.ltxv_layout import GUESSED_VAES, diffusers_to_original, transformer_config, vae_layout
from trainer.sampling import denoise, initial_noise

T5_DIM = 32
T5_LEN = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ltxv(tmp_path_factory) -> dict:
    """A non-causal (0.9.0 / 0.9.1 style) file: what diffusers' LTXPipeline samples."""
    cfg = write_ltxv_files(tmp_path_factory.mktemp("ltxv"), t5_dim=T5_DIM)
    return {**cfg, "t5_max_length": T5_LEN}


@pytest.fixture(scope="module")
def model(ltxv):
    return _load(ltxv)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_video_dataset(tmp_path_factory.mktemp("clips") / "data", n=3, size=(32, 32), frames=12, fps=16)


def _load(cfg: dict):
    return load_ltxv(ModelConfig(**cfg), torch.device("cpu"), torch.float32)


def _video_job(model_cfg: dict, data: Path, out: Path, **train) -> dict:
    d = job_dict(model_cfg, data, out, **train)
    p = d["config"]["process"][0]
    p["datasets"][0].update(num_frames=9, resolution=[32])
    p["sample"].update(width=32, height=32, num_frames=9)
    return d


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # LTX-Video's own scheduler config (Lightricks/LTX-Video scheduler_config.json)
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                           base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)


def _unpack(x: torch.Tensor, shape) -> torch.Tensor:
    b, c, f, h, w = shape
    return x.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- layouts --------------------------------------------------------------------------------------------------

def test_transformer_layout_agrees_with_diffusers_converter():
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

    cfg = ltxv_diffusers_config(inner=64, heads=2, layers=3, caption_channels=48)
    with torch.device("meta"):
        m = LTXVideoTransformer3DModel(**cfg)
    tagged = {k: torch.full((1,), float(i)) for i, k in enumerate(m.state_dict())}
    original = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_original(dict(tagged), 3).items()}
    back = convert_ltx_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(tagged) and all(torch.equal(back[k], tagged[k]) for k in tagged)


@pytest.mark.parametrize("version", [*GUESSED_VAES, "tiny"])
def test_vae_layouts_agree_with_diffusers_converter(version):
    """ComfyUI's three guessed layouts (0.9.0, 0.9.1, 0.9.5+) and the demo's: our config and names, read back by
    diffusers' own single-file converter, land on every key of the AutoencoderKLLTXVideo our config builds."""
    from diffusers import AutoencoderKLLTXVideo
    from diffusers.loaders.single_file_utils import convert_ltx_vae_checkpoint_to_diffusers

    lay = vae_layout(TINY_VAE if version == "tiny" else GUESSED_VAES[version], 128, version)
    with torch.device("meta"):
        m = AutoencoderKLLTXVideo(**lay.config)
    sd = m.state_dict()
    named = {id(t): k for k, t in sd.items()}
    original = {f"vae.{lay.to_original(k)}": t for k, t in sd.items()}
    original["vae.per_channel_statistics.channel"] = torch.empty(128, device="meta")
    back = convert_ltx_vae_checkpoint_to_diffusers(original) if version != "tiny" else None
    if back is not None:  # (the converter's tables know only the released layouts)
        assert set(back) == set(sd) and all(named[id(t)] == k for k, t in back.items())
    assert (m.spatial_compression_ratio, m.temporal_compression_ratio) == (32, 8)
    assert lay.decoder_padding == ("zeros" if version == "tiny" else "reflect")  # ComfyUI's decoder default


def test_real_size_configs_from_shapes():
    """2B (28 x 2048) and 13B (48 x 4096): the config derived from the original shapes (ComfyUI's 32 heads) equals
    theirs; the metadata's causal flag is read."""
    from diffusers import LTXVideoTransformer3DModel

    for heads, head_dim, layers in ((32, 64, 28), (32, 128, 48)):
        cfg = ltxv_diffusers_config(inner=heads * head_dim, heads=heads, layers=layers, caption_channels=4096)
        with torch.device("meta"):
            m = LTXVideoTransformer3DModel(**cfg)
        orig = diffusers_to_original(dict(m.state_dict()), layers)
        got, pos = transformer_config({k: tuple(v.shape) for k, v in orig.items()}, {"causal_temporal_positioning": True}, "x")
        assert {k: got[k] for k in cfg} == cfg and pos.causal


# --- loading ----------------------------------------------------------------------------------------------------

def test_loads_a_lightricks_checkpoint_and_refuses_other_files(ltxv, model, tiny_flux, tmp_path):
    assert model.arch == "ltxv" and model.is_video and model.pixel_factor == 32 and model.snap_frames(12) == 9
    assert model.latent_shape(64, 32, 17) == (1, 128, 3, 1, 2)
    keys = [t.key for t in model.targets()]
    assert keys[:3] == ["diffusion_model.transformer_blocks.0.attn1.to_q", "diffusion_model.transformer_blocks.0.attn1.to_k",
                        "diffusion_model.transformer_blocks.0.attn1.to_v"]
    assert len(keys) == 2 * 10 and "diffusion_model.transformer_blocks.1.ff.net.2" in keys
    assert not model.positions.causal and model.vae.config.timestep_conditioning
    with pytest.raises(ModelFileError, match="this is a flux checkpoint, but model.arch is 'ltxv'"):
        _load(dict(ltxv, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match="holds no LTX-Video VAE"):
        _load(dict(ltxv, vae_path=tiny_flux["vae_path"]))
    with pytest.raises(ModelFileError, match="T5-XXL"):
        _load(dict(ltxv, text_encoder_paths=[]))


def test_loads_a_diffusers_folder(model, tmp_path):
    """A local diffusers folder (transformer, vae, text_encoder, tokenizer) loads to the same model; its positions
    follow the VAE (0.9.5-style, as the demo's: the first frame counted causally, as LTXConditionPipeline does)."""
    import json

    from trainer.models.ltxv import LTXVModel
    from trainer.models.ltxv_layout import Positions

    folder = tmp_path / "ltx_diffusers"
    model.denoiser.save_pretrained(folder / "transformer")
    model.vae.save_pretrained(folder / "vae")
    model.t5.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LTXConditionPipeline"}))
    loaded = _load({"arch": "ltxv", "name_or_path": str(folder), "t5_max_length": T5_LEN})
    assert loaded.positions.causal
    same = LTXVModel(model.denoiser, model.vae, model.t5, model.tokenizer, torch.device("cpu"), torch.float32,
                     Positions(causal=True), T5_LEN)
    cond = loaded.encode_text(["a red circle"])
    torch.testing.assert_close(cond["context"], same.encode_text(["a red circle"])["context"], rtol=0, atol=0)
    x = torch.randn(1, 128, 3, 2, 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, torch.tensor([0.4]), cond), same.predict(x, torch.tensor([0.4]), cond),
                                   rtol=0, atol=1e-6)


# --- against the reference pipelines --------------------------------------------------------------------------

def test_prompt_encoding_is_t5_with_its_mask(model):
    """Tokens and mask are LTXPipeline's; T5 runs with the mask as ComfyUI runs it (LTXPipeline runs T5 without it,
    so the two agree where a prompt has no padding and differ where it has)."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline(scheduler=_scheduler(), vae=None, text_encoder=model.t5, tokenizer=model.tokenizer,
                       transformer=None)
    prompts = ["a red circle moving", "sks a blue square on a black background"]
    ours = model.encode_text(prompts)
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
    assert ours["context"].shape == (2, T5_LEN, T5_DIM) and torch.equal(ours["attention_mask"], mask.float())
    tok = model.tokenizer(prompts, padding="max_length", max_length=T5_LEN, return_tensors="pt")
    with torch.no_grad():
        masked = model.t5(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    torch.testing.assert_close(ours["context"], masked, rtol=0, atol=1e-6)
    full = [" ".join(["red circle"] * 10)]  # longer than T5_LEN: no padding, so no mask to differ by
    theirs, _, _, _ = pipe.encode_prompt(full, do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
    torch.testing.assert_close(model.encode_text(full)["context"], theirs, rtol=0, atol=1e-6)


def test_sigmas_are_ltxv_schedulers():
    """ComfyUI's LTXVScheduler (stretched to 0.1) is FlowMatchEulerDiscreteScheduler with LTX-Video's config."""
    sched = _scheduler()
    for steps, tokens in ((4, 12), (20, 4096), (30, 7000)):
        import numpy as np

        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        mu = calculate_shift(tokens, 1024, 4096, 0.95, 2.05)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(ltxv_sigmas(steps, tokens), sched.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fps", [None, 12.0])
def test_sampler_matches_ltx_pipeline(model, fps):
    """Without cond["fps"] at the native 25; with it (a clip resampled to 12 fps), at that rate, as LTXPipeline's
    frame_rate (ComfyUI's LTXVConditioning frame_rate) positions it; the rate changes the output."""
    from diffusers import LTXPipeline

    cond, neg = model.encode_text(["a red circle moving"]), model.encode_text([""])
    if fps is not None:
        cond["fps"] = neg["fps"] = torch.tensor([fps])
    noise = initial_noise(model, 64, 96, seed=3, frames=17)
    assert noise.shape == (1, 128, 3, 3, 2)
    ours = denoise(model, noise, cond, neg, steps=4, guidance_scale=3.0)
    pipe = LTXPipeline(scheduler=_scheduler(), vae=model.vae, text_encoder=model.t5, tokenizer=model.tokenizer,
                       transformer=model.denoiser)
    theirs = pipe(prompt_embeds=cond["context"], prompt_attention_mask=cond["attention_mask"],
                  negative_prompt_embeds=neg["context"], negative_prompt_attention_mask=neg["attention_mask"],
                  width=64, height=96, num_frames=17, num_inference_steps=4, guidance_scale=3.0, latents=_pack(noise),
                  frame_rate=fps or 25, output_type="latent").frames
    err = _rel(ours, _unpack(theirs, noise.shape))
    assert err < 1e-3, err
    assert model.decode(ours).shape == (1, 3, 17, 96, 64)
    if fps is not None:
        native = denoise(model, noise, {k: v for k, v in cond.items() if k != "fps"},
                         {k: v for k, v in neg.items() if k != "fps"}, steps=4, guidance_scale=3.0)
        assert _rel(native, ours) > 1e-3


def test_i2v_sampler_matches_pipeline_and_keeps_the_start_frame(model):
    """The seam's sampler side: the start image's latent is the first latent frame at every step (the output keeps it
    exactly), its tokens at timestep 0, as LTXImageToVideoPipeline samples."""
    from diffusers import LTXImageToVideoPipeline
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    start = torch.rand(3, 96, 64, generator=g) * 2 - 1
    first = {k: v[None] for k, v in model.encode_conditions(torch.zeros(3, 17, 96, 64), start).items()}
    cond, neg = {**model.encode_text(["a red square"]), **first}, {**model.encode_text([""]), **first}
    noise = initial_noise(model, 64, 96, seed=5, frames=17)
    ours = denoise(model, noise, cond, neg, steps=3, guidance_scale=2.0)
    assert torch.equal(ours[:, :, :1], first["first_frame"])
    pipe = LTXImageToVideoPipeline(scheduler=_scheduler(), vae=model.vae, text_encoder=model.t5,
                                   tokenizer=model.tokenizer, transformer=model.denoiser)
    given = noise.clone()
    given[:, :, :1] = first["first_frame"]  # the pipeline's own start: the image latent, then noise
    theirs = pipe(image=Image.new("RGB", (64, 96)), prompt_embeds=cond["context"],
                  prompt_attention_mask=cond["attention_mask"], negative_prompt_embeds=neg["context"],
                  negative_prompt_attention_mask=neg["attention_mask"], width=64, height=96, num_frames=17,
                  num_inference_steps=3, guidance_scale=2.0, latents=_pack(given), frame_rate=25,
                  output_type="latent").frames
    err = _rel(ours, _unpack(theirs, noise.shape))
    assert err < 1e-3, err
    # the causal VAE: a clip's first latent frame is its first frame's own latent (do_i2v's start frame)
    clip = torch.rand(1, 3, 17, 96, 64, generator=g) * 2 - 1
    clip[:, :, 0] = start
    assert _rel(model.encode_pixels(clip)[:, :, :1], first["first_frame"]) < 1e-4


# --- training -------------------------------------------------------------------------------------------------

def test_trains_on_clips_and_saves_comfyui_keys_diffusers_reloads(ltxv, clips, tmp_path):
    d = _video_job(ltxv, clips, tmp_path / "out", steps=2, cache_text_embeddings=True)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    lat = next(iter(trainer.latents.mem.values()))
    assert lat.shape == (128, 2, 1, 1)  # 9 frames -> 2 latent frames, 32 px -> 1
    trainer.train()
    run = tmp_path / "out" / "run"
    sd = load_file(str(run / "run.safetensors"))
    assert "diffusion_model.transformer_blocks.0.attn2.to_k.lora_down.weight" in sd
    assert "diffusion_model.transformer_blocks.1.ff.net.0.proj.alpha" in sd and not any(k.startswith("transformer.") for k in sd)
    assert sorted(p.suffix for p in (run / "samples").glob("000000002_00.*")) == [".mp4", ".png"]

    # diffusers' own LTX-Video LoRA loader into a fresh model: it converts ComfyUI's diffusion_model.* names but
    # takes peft's lora_A / lora_B (which ComfyUI reads as lora_down / lora_up) and no `.alpha`, so the file's
    # tensors are renamed and each alpha / rank folded into its up matrix (what the alpha means)
    from diffusers import LTXPipeline

    folded = {}
    for k, v in sd.items():
        if k.endswith(".lora_up.weight"):
            v = v * (sd[k.replace(".lora_up.weight", ".alpha")] / v.shape[1])
        if not k.endswith(".alpha"):
            folded[k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")] = v

    g = torch.Generator().manual_seed(1)
    noisy, sigmas = torch.randn(1, 128, 2, 2, 1, generator=g), torch.tensor([0.6])
    cond = {"context": torch.randn(1, T5_LEN, T5_DIM, generator=g), "attention_mask": torch.ones(1, T5_LEN)}
    with torch.no_grad():
        ours = trainer.model.predict(noisy, sigmas, cond)
    fresh = _load(ltxv)
    pipe = LTXPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=fresh.denoiser)
    pipe.load_lora_weights(folded)
    with torch.no_grad():
        theirs = fresh.predict(noisy, sigmas, cond)
        base = _load(ltxv).predict(noisy, sigmas, cond)
    err, effect = _rel(theirs, ours), _rel(ours, base)
    assert err < 1e-4 and effect > 100 * err, (err, effect)


def test_resume_on_clips_matches_uninterrupted(ltxv, clips, tmp_path):
    extra = dict(steps=4, lr_scheduler="cosine", cache_text_embeddings=True, disable_sampling=True,
                 gradient_checkpointing=True)
    d = _video_job(ltxv, clips, tmp_path / "a", **extra)
    d["config"]["process"][0]["datasets"][0].update(frames=[1, 9], shrink_video_to_frames=False, clips_per_video=2,
                                                    flip_x=True, do_i2v=True)
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_i2v_training_gives_the_start_frame_and_leaves_it_out_of_the_loss(ltxv, clips, tmp_path):
    """The seam's loop side: with do_i2v the first latent frame goes into the model clean (the clip's first frame's
    latent), at timestep 0, and nothing the model says about it reaches the loss; the other frames do."""
    d = _video_job(ltxv, clips, tmp_path / "out", steps=1, cache_text_embeddings=True, disable_sampling=True)
    d["config"]["process"][0]["datasets"][0]["do_i2v"] = True
    trainer = build_trainer(load_job_dict(d), report=quiet)
    key, cond = next(iter(trainer.latents.conds.items()))
    assert cond["first_frame"].shape == (128, 1, 1, 1)
    assert _rel(cond["first_frame"], trainer.latents.mem[key][:, :1]) < 1e-4
    seen = {}

    def record(module, args, kwargs):
        seen.update(tokens=kwargs["hidden_states"].detach().clone(), t=kwargs["timestep"].detach().clone())

    def shift_tokens(index):
        def hook(module, args, out):
            o = out[0].clone()
            o[:, index] += 100.0
            return (o,)
        return hook

    def loss(hook=None) -> float:
        handles = [trainer.model.denoiser.register_forward_pre_hook(record, with_kwargs=True)]
        if hook is not None:
            handles.append(trainer.model.denoiser.register_forward_hook(hook))
        try:
            with torch.no_grad():
                return float(trainer._loss(0, torch.Generator().manual_seed(9)))
        finally:
            for h in handles:
                h.remove()

    base = loss()
    batch = trainer.plan.batch(0)[0]
    first = trainer.latents.get_conditions(batch.dataset, batch.entry, trainer.model)["first_frame"]
    # one token per latent frame at 32 px: token 0 is the start frame, token 1 the generated one
    assert torch.equal(seen["tokens"][0, 0], first[:, 0, 0, 0]) and seen["t"][0, 0] == 0 and seen["t"][0, 1] > 0
    assert loss(shift_tokens(0)) == base
    assert loss(shift_tokens(1)) > base + 1.0
    # a one-frame item (an image, a clip's 1-frame bucket) has nothing to generate from a start image: marked not given
    one = trainer.model.encode_conditions(torch.zeros(3, 1, 32, 32), torch.zeros(3, 32, 32))
    assert float(one["first_frame_given"]) == 0.0
    trainer.train()
    assert (tmp_path / "out" / "run" / "run.safetensors").exists()


def test_each_clip_and_preview_is_positioned_at_its_frame_rate(ltxv, clips, tmp_path):
    """datasets[].fps resamples the clips and conditions them at that rate (cond["fps"], the seam's
    conditions_on_fps); a dataset without fps trains at the native 25; previews at sample.fps."""
    d = _video_job(ltxv, clips, tmp_path / "out", steps=1, cache_text_embeddings=True)
    p = d["config"]["process"][0]
    p["datasets"].append(dict(p["datasets"][0]))
    p["datasets"][0]["fps"] = 12.0
    p["sample"]["fps"] = 10.0
    job = load_job_dict(d)
    trainer = build_trainer(job, report=quiet)
    rates = set()
    for micro in range(trainer.plan.batches_per_epoch):
        _, _, _, cond = trainer.batch_inputs(micro, torch.Generator().manual_seed(0))
        rates.update(float(r) for r in cond["fps"])
    assert rates == {12.0, 25.0}
    (prepared,) = trainer.samples
    assert float(prepared.request.cond["fps"]) == float(prepared.request.neg_cond["fps"]) == 10.0
