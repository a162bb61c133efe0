"""Wan 2.1 (T2V, I2V): layouts against diffusers' converters, loading from ComfyUI's files, prompt encoding and
sampling against WanPipeline / WanImageToVideoPipeline, saved LoRAs read by diffusers' Wan LoRA loader, and
training on video clips with resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import job_dict, quiet, run_through_and_resumed
from trainer.config import ModelConfig, load_job_dict
from trainer.demo.videos import make_video_dataset
from trainer.demo.wan import wan_diffusers_config, write_wan_files
from trainer.errors import ConfigError, DatasetError, ModelFileError
from trainer.job import build_trainer
from trainer.models.wan import I2V, T2V, VACE, load_wan
from trainer.sampling import denoise, initial_noise

TEXT_DIM = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wan_t2v(tmp_path_factory) -> dict:
    return write_wan_files(tmp_path_factory.mktemp("wan_t2v"), text_dim=TEXT_DIM)


@pytest.fixture(scope="module")
def wan_i2v(tmp_path_factory) -> dict:
    return write_wan_files(tmp_path_factory.mktemp("wan_i2v"), i2v=True, text_dim=TEXT_DIM, name="wan_i2v",
                           image_dim=32, clip_layers=2)


@pytest.fixture(scope="module")
def wan_vace(tmp_path_factory) -> dict:
    return write_wan_files(tmp_path_factory.mktemp("wan_vace"), vace=True, text_dim=TEXT_DIM, name="wan_vace")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_video_dataset(tmp_path_factory.mktemp("clips") / "data", n=3, size=(32, 32), frames=12, fps=16)


def _load(cfg: dict, variant=T2V):
    return load_wan(ModelConfig(**cfg), torch.device("cpu"), torch.float32, variant)


def _video_job(model: dict, data: Path, out: Path, **train) -> dict:
    d = job_dict(model, data, out, **train)
    p = d["config"]["process"][0]
    p["datasets"][0].update(num_frames=5, resolution=[32])
    p["sample"].update(width=32, height=32, num_frames=5)
    return d


# --- layouts --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_transformer_layout_agrees_with_diffusers_converter(kind):
    """Our original-layout names, read by diffusers' own single-file converter, land on every diffusers key."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from trainer.models.wan_layout import diffusers_config_from_original, diffusers_to_original

    cfg = wan_diffusers_config(dim=256, layers=3, ffn=512, text_dim=64, i2v=kind == "i2v", image_dim=48)
    with torch.device("meta"):
        m = WanTransformer3DModel(**cfg)
    tagged = {k: torch.full((1,), float(i)) for i, k in enumerate(m.state_dict())}
    original = diffusers_to_original(dict(tagged), dict(m.config))
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(tagged) and all(torch.equal(back[k], tagged[k]) for k in tagged)
    real = diffusers_to_original({k: v for k, v in m.state_dict().items()}, dict(m.config))
    derived = diffusers_config_from_original({k: tuple(v.shape) for k, v in real.items()}, "x")
    for key, value in cfg.items():
        assert tuple(derived[key]) == tuple(value) if isinstance(value, tuple) else derived[key] == value, key


def test_vae_layout_agrees_with_diffusers_converter():
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from trainer.models.wan_layout import vae_key_to_original

    with torch.device("meta"):
        vae = AutoencoderKLWan(base_dim=96)  # Wan 2.1's real VAE
    keys = list(vae.state_dict())
    back = convert_wan_vae_to_diffusers({vae_key_to_original(k): torch.tensor([i]) for i, k in enumerate(keys)})
    assert len(back) == len(keys) and all(int(back[k]) == i for i, k in enumerate(keys))


def test_real_size_configs_from_shapes():
    """Wan 2.1 1.3B and 14B (T2V and I2V): the config derived from the original layout's shapes equals theirs."""
    from diffusers import WanTransformer3DModel

    from trainer.models.wan_layout import diffusers_config_from_original, diffusers_to_original

    real = [dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16),  # 1.3B
            dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16),  # 14B
            dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, image_dim=1280,
                 added_kv_proj_dim=5120)]  # I2V 14B
    for over in real:
        cfg = dict(patch_size=(1, 2, 2), attention_head_dim=128, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **over)
        with torch.device("meta"):
            m = WanTransformer3DModel(**cfg)
        orig = diffusers_to_original(dict(m.state_dict()), dict(m.config))
        got = diffusers_config_from_original({k: tuple(v.shape) for k, v in orig.items()}, "x")
        assert {k: got[k] for k in cfg} == {k: (tuple(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def test_loads_comfyui_files_and_refuses_other_variants(wan_t2v, wan_i2v, tiny_flux):
    model = _load(wan_t2v)
    assert model.arch == "wan21" and model.is_video and model.pixel_factor == 16
    assert [t.key for t in model.targets()][:3] == ["diffusion_model.blocks.0.self_attn.q",
                                                    "diffusion_model.blocks.0.self_attn.k",
                                                    "diffusion_model.blocks.0.self_attn.v"]
    i2v_keys = [t.key for t in _load(wan_i2v, I2V).targets()]
    assert "diffusion_model.blocks.1.cross_attn.k_img" in i2v_keys and len(i2v_keys) == 2 * 12
    with pytest.raises(ModelFileError, match="a Wan 2.1 I2V checkpoint, but model.arch is 'wan21'; use model.arch wan21_i2v"):
        _load(dict(wan_i2v))
    with pytest.raises(ModelFileError, match="Wan 2.1 T2V checkpoint, but model.arch is 'wan21_i2v'"):
        _load(dict(wan_t2v, arch="wan21_i2v"), I2V)
    with pytest.raises(ModelFileError, match="this is a flux checkpoint, but model.arch is 'wan21'"):
        _load(dict(wan_t2v, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match="UMT5-XXL"):
        _load(dict(wan_t2v, text_encoder_paths=[]))


# --- against the reference pipelines --------------------------------------------------------------------------

def _pipeline(model, i2v: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=model.sample_shift)
    if i2v:
        return WanImageToVideoPipeline(tokenizer=model.tokenizer, text_encoder=model.umt5, vae=model.vae,
                                       scheduler=sched, transformer=model.denoiser, image_encoder=model.clip_vision,
                                       image_processor=ComfyClipPreprocess(model))
    return WanPipeline(tokenizer=model.tokenizer, text_encoder=model.umt5, vae=model.vae, scheduler=sched,
                       transformer=model.denoiser)


class ComfyClipPreprocess:
    """The pipeline's image_processor slot, filled with ComfyUI's CLIP preprocessing (which ours follows; the
    integration tests compare it with ComfyUI's own): the pipeline's CLIPImageProcessor resizes in PIL instead."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, images, return_tensors="pt"):
        from trainer.data.dataset import fit_pixels

        image = images[0] if isinstance(images, list) else images
        from transformers import BatchFeature

        return BatchFeature({"pixel_values": self.model.clip_pixels(fit_pixels(image, image.size, False))})


def test_prompt_encoding_matches_pipeline(wan_t2v):
    model = _load(wan_t2v)
    prompts = ["a red circle moving", "sks a blue square on a black background"]
    ours = model.encode_text(prompts)["context"]
    theirs, _ = _pipeline(model).encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=32)
    assert ours.shape == (2, 32, TEXT_DIM)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)
    assert float(ours[0, 10:].abs().max()) == 0.0  # the padding is zeroed


def test_sampler_matches_wan_pipeline(wan_t2v):
    model = _load(wan_t2v)
    cond = model.encode_text(["a red circle moving"])
    neg = model.encode_text([""])
    noise = initial_noise(model, 32, 48, seed=3, frames=9)
    assert noise.shape == (1, 16, 3, 6, 4)
    ours = denoise(model, noise, cond, neg, steps=4, guidance_scale=3.0)
    theirs = _pipeline(model)(prompt_embeds=cond["context"], negative_prompt_embeds=neg["context"], height=48,
                              width=32, num_frames=9, num_inference_steps=4, guidance_scale=3.0, latents=noise,
                              output_type="latent").frames
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-3, err
    video = model.decode(ours)
    assert video.shape == (1, 3, 9, 48, 32)


def test_i2v_sampler_matches_pipeline(wan_i2v):
    model = _load(wan_i2v, I2V)
    start = Image.new("RGB", (32, 32), (200, 40, 40))
    from trainer.data.dataset import fit_pixels

    start_t = fit_pixels(start, (32, 32), False)
    cond = {**model.encode_text(["a red square"]), **{k: v[None] for k, v in model.image_condition(start_t, 9).items()}}
    neg = {**model.encode_text([""]), "image_cond": cond["image_cond"], "clip_fea": cond["clip_fea"]}
    noise = initial_noise(model, 32, 32, seed=5, frames=9)
    ours = denoise(model, noise, cond, neg, steps=3, guidance_scale=2.0)
    pipe = _pipeline(model, i2v=True)
    from trainer.models.wan import pad_text

    # diffusers' I2V attention assumes 512 text tokens (as ComfyUI's UMT5 gives): the embeddings padded as ours are
    theirs = pipe(image=start, prompt_embeds=pad_text(cond["context"]), negative_prompt_embeds=pad_text(neg["context"]),
                  height=32, width=32, num_frames=9, num_inference_steps=3,
                  guidance_scale=2.0, latents=noise, output_type="latent").frames
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-3, err


# --- training -------------------------------------------------------------------------------------------------

def test_trains_on_clips_and_saves_comfyui_keys_diffusers_reloads(wan_t2v, clips, tmp_path):
    d = _video_job(wan_t2v, clips, tmp_path / "out", steps=2, cache_text_embeddings=True)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    lat = next(iter(trainer.latents.mem.values()))
    assert lat.shape == (16, 2, 4, 4)  # 5 frames -> 2 latent frames, 32 px -> 4
    trainer.train()
    run = tmp_path / "out" / "run"
    sd = load_file(str(run / "run.safetensors"))
    assert "diffusion_model.blocks.0.cross_attn.k.lora_down.weight" in sd and "diffusion_model.blocks.1.ffn.2.alpha" in sd
    assert sorted(p.suffix for p in (run / "samples").glob("000000002_00.*")) == [".mp4", ".png"]

    # diffusers' own Wan LoRA loader, reading the ComfyUI-keyed file into a fresh model, predicts as we do
    from diffusers import WanPipeline

    model = trainer.model
    g = torch.Generator().manual_seed(1)
    noisy, sigmas = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([0.6])
    cond = {"context": torch.randn(1, 32, TEXT_DIM, generator=g)}
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond)
    fresh = _load(wan_t2v)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=fresh.denoiser)
    pipe.load_lora_weights(str(run / "run.safetensors"))
    with torch.no_grad():
        theirs = fresh.predict(noisy, sigmas, cond)
        base = _load(wan_t2v).predict(noisy, sigmas, cond)
    err = float((theirs - ours).abs().max() / ours.abs().max())
    effect = float((ours - base).abs().max() / ours.abs().max())
    assert err < 1e-4 and effect > 100 * err, (err, effect)


def test_resume_on_video_clips_matches_uninterrupted(wan_t2v, clips, tmp_path):
    extra = dict(steps=4, lr_scheduler="cosine", cache_text_embeddings=True, disable_sampling=True)
    d = _video_job(wan_t2v, clips, tmp_path / "a", **extra)
    d["config"]["process"][0]["datasets"][0].update(frames=[1, 5], shrink_video_to_frames=False, clips_per_video=2,
                                                    flip_x=True)
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_i2v_trains_on_first_frames_and_refuses_no_start_image(wan_i2v, clips, tmp_path):
    d = _video_job(wan_i2v, clips, tmp_path / "out", steps=1, cache_text_embeddings=True, disable_sampling=True)
    with pytest.raises(ConfigError, match="do_i2v: true .* or datasets\\[\\]\\.control_path"):
        build_trainer(load_job_dict(d), report=quiet)
    d["config"]["process"][0]["datasets"][0]["do_i2v"] = True
    trainer = build_trainer(load_job_dict(d), report=quiet)
    cond = next(iter(trainer.latents.conds.values()))
    assert cond["image_cond"].shape == (20, 2, 4, 4) and cond["clip_fea"].shape[-1] == 32
    assert torch.equal(cond["image_cond"][:4, 0], torch.ones(4, 4, 4)) and not cond["image_cond"][:4, 1].any()
    trainer.train()
    assert (tmp_path / "out" / "run" / "run.safetensors").exists()


def test_video_keys_refused_on_image_families(tiny_flux, clips, tmp_path):
    d = job_dict(tiny_flux, clips, tmp_path)
    d["config"]["process"][0]["datasets"][0]["num_frames"] = 9
    with pytest.raises(ConfigError, match="datasets\\[0\\].num_frames: model.arch 'flux' trains images"):
        load_job_dict(d)


# --- VACE -----------------------------------------------------------------------------------------------------

def _frames(n: int, size=(32, 32), seed: int = 0) -> list:
    from trainer.demo.videos import moving_shape_frames

    import random

    return moving_shape_frames(size, n, "red", "blue", "circle", random.Random(seed))


def _mask_frames(n: int, size=(32, 32)) -> list:
    """The right half generated (white), the left half kept (black), every frame."""
    m = Image.new("RGB", size, (0, 0, 0))
    m.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    return [m] * n


def test_vace_layout_and_refusals(wan_vace, wan_t2v, tiny_flux, clips, tmp_path):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from trainer.models.wan_layout import diffusers_to_original

    cfg = wan_diffusers_config(dim=256, layers=4, ffn=512, text_dim=64, vace_layers=2)
    with torch.device("meta"):
        m = WanVACETransformer3DModel(**cfg)
    tagged = {k: torch.full((1,), float(i)) for i, k in enumerate(m.state_dict())}
    back = convert_wan_transformer_to_diffusers(diffusers_to_original(dict(tagged), dict(m.config)))
    assert set(back) == set(tagged) and all(torch.equal(back[k], tagged[k]) for k in tagged)
    model = _load(wan_vace, VACE)
    keys = [t.key for t in model.targets()]
    assert "diffusion_model.vace_blocks.0.before_proj" in keys and "diffusion_model.vace_blocks.0.after_proj" in keys
    assert model.repeated_blocks()[0] is model.denoiser.vace_blocks[0]
    with pytest.raises(ModelFileError, match="a Wan 2.1 VACE checkpoint, but model.arch is 'wan21'; use model.arch wan21_vace"):
        _load(dict(wan_vace, arch="wan21"))
    d = _video_job(wan_vace, clips, tmp_path, steps=1)
    with pytest.raises(ConfigError, match="VACE trains on control data.*or train on the Wan 2.1 T2V base"):
        load_job_dict(d)
    d = _video_job(wan_t2v, clips, tmp_path, steps=1)
    d["config"]["process"][0]["datasets"][0]["mask_path"] = str(clips)
    with pytest.raises(ConfigError, match="mask_path: model.arch 'wan21' takes no masks"):
        load_job_dict(d)


def test_vace_sampler_matches_pipeline(wan_vace):
    """WanVACEPipeline given the control video and a binary mask: our condition (inactive / reactive latents, the
    8x8-folded mask) and sampler give its latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    from trainer.data.dataset import fit_pixels

    model = _load(wan_vace, VACE)
    video, masks = _frames(9), _mask_frames(9)
    control = torch.stack([fit_pixels(f, (32, 32), False) for f in video], dim=1)
    mask = torch.stack([fit_pixels(f, (32, 32), False) for f in masks], dim=1).mean(0, keepdim=True).add(1).div(2)
    cond = {**model.encode_text(["a red circle"]), "vace": model.vace_condition(control, mask, 9)["vace"][None]}
    assert cond["vace"].shape == (1, 96, 3, 4, 4)
    neg = {**model.encode_text([""]), "vace": cond["vace"]}
    noise = initial_noise(model, 32, 32, seed=9, frames=9)
    ours = denoise(model, noise, cond, neg, steps=3, guidance_scale=2.5)
    pipe = WanVACEPipeline(tokenizer=model.tokenizer, text_encoder=model.umt5, vae=model.vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=model.sample_shift), transformer=model.denoiser)
    theirs = pipe(video=video, mask=masks, prompt_embeds=cond["context"], negative_prompt_embeds=neg["context"],
                  height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=2.5, latents=noise,
                  output_type="latent").frames
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-3, err


def test_vace_reference_image_sampling_matches_pipeline(wan_vace):
    """WanVACEPipeline with a reference image beside the control video: the reference's latent frame goes before the
    control's and the noise has one latent frame more (dropped before decoding); our condition and leading noise
    frame give its latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    from trainer.data.dataset import fit_pixels
    from trainer.sampling import leading_frames

    model = _load(wan_vace, VACE)
    video, masks = _frames(9), _mask_frames(9)
    ref = _frames(1, seed=7)[0]
    control = torch.stack([fit_pixels(f, (32, 32), False) for f in video], dim=1)
    mask = torch.stack([fit_pixels(f, (32, 32), False) for f in masks], dim=1).mean(0, keepdim=True).add(1).div(2)
    vc = {k: v[None] for k, v in model.vace_condition(control, mask, 9, fit_pixels(ref, (32, 32), False)).items()}
    assert vc["vace"].shape == (1, 96, 4, 4, 4) and vc["vace_reference"].shape == (1, 16, 1, 4, 4)
    cond = {**model.encode_text(["a red circle"]), **vc}
    neg = {**model.encode_text([""]), **vc}
    assert leading_frames(model, cond) == 1
    noise = initial_noise(model, 32, 32, seed=9, frames=9, leading=1)
    assert noise.shape[2] == 4
    ours = denoise(model, noise, cond, neg, steps=3, guidance_scale=2.5)
    pipe = WanVACEPipeline(tokenizer=model.tokenizer, text_encoder=model.umt5, vae=model.vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=model.sample_shift), transformer=model.denoiser)
    theirs = pipe(video=video, mask=masks, reference_images=[ref], prompt_embeds=cond["context"],
                  negative_prompt_embeds=neg["context"], height=32, width=32, num_frames=9, num_inference_steps=3,
                  guidance_scale=2.5, latents=noise, output_type="latent").frames
    assert theirs.shape == ours.shape == (1, 16, 4, 4, 4)  # diffusers drops the reference frame when it decodes
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-3, err


def test_vace_trains_with_reference_images(wan_vace, clips, tmp_path):
    """datasets[].reference_path: each clip's reference image is encoded as a latent frame trained on before the
    clip's (control dropout leaves it), previews with sample.samples[].reference_image come out at the clip's
    length, and an item without a reference is one clear error."""
    refs = tmp_path / "refs"
    refs.mkdir()
    stems = sorted(p.stem for p in clips.glob("*.mp4"))
    for i, stem in enumerate(stems):
        _frames(1, seed=20 + i)[0].save(refs / f"{stem}.png")
    d = _video_job(wan_vace, clips, tmp_path / "out", steps=2, cache_text_embeddings=True, sample_every=2)
    p = d["config"]["process"][0]
    p["datasets"][0].update(reference_path=str(refs), control_dropout=1.0)
    p["sample"].update(samples=[{"prompt": "a red circle", "reference_image": str(refs / f"{stems[0]}.png")}])
    trainer = build_trainer(load_job_dict(d), report=quiet)
    latents, noise, sigmas, cond = trainer.batch_inputs(0, torch.Generator().manual_seed(0))
    assert latents.shape[2] == 3 and noise.shape == latents.shape  # 5 frames = 2 latent frames, the reference first
    assert torch.equal(latents[:, :, :1], cond["vace_reference"]) and bool(cond["vace_reference"].abs().sum() > 0)
    assert not bool(cond["vace"].any())  # dropout took the control, not the reference frame
    trainer.train()
    index = (tmp_path / "out" / "run" / "samples" / "index.jsonl").read_text().splitlines()
    assert '"frames": 5' in index[-1] and f"{stems[0]}.png" in index[-1]
    (refs / f"{stems[1]}.png").unlink()
    p["training_folder"] = str(tmp_path / "out2")
    with pytest.raises(DatasetError, match=r"reference_path: 1 items have no reference image.*" + stems[1]):
        build_trainer(load_job_dict(d), report=quiet)
    t2v = _video_job(wan_vace | {"arch": "wan21"}, clips, tmp_path / "x", steps=1)
    t2v["config"]["process"][0]["datasets"][0]["reference_path"] = str(refs)
    with pytest.raises(ConfigError, match="reference_path: model.arch 'wan21' takes no reference images"):
        load_job_dict(t2v)


def test_vace_trains_on_control_videos_and_masks(wan_vace, clips, tmp_path):
    from trainer.data.media import write_video

    controls, masks = tmp_path / "controls", tmp_path / "masks"
    for p in sorted(clips.glob("*.mp4")):
        write_video(controls / p.name, _frames(12, seed=len(p.stem)), 16)
        write_video(masks / p.name, _mask_frames(12), 16)
    d = _video_job(wan_vace, clips, tmp_path / "out", steps=2, cache_text_embeddings=True, disable_sampling=True)
    d["config"]["process"][0]["datasets"][0].update(control_path=str(controls), mask_path=str(masks))
    trainer = build_trainer(load_job_dict(d), report=quiet)
    cond = next(iter(trainer.latents.conds.values()))
    assert cond["vace"].shape == (96, 2, 4, 4)
    folded = cond["vace"][32:]
    assert torch.equal(folded.amax(dim=(0, 1, 2))[:2], torch.zeros(2)) and bool((folded[:, :, :, 2:] == 1).all())
    trainer.train()
    sd = load_file(str(tmp_path / "out" / "run" / "run.safetensors"))
    assert "diffusion_model.vace_blocks.0.before_proj.lora_down.weight" in sd


def test_session_samples_vace_with_a_reference_image(wan_vace, clips, tmp_path):
    """The nodes' Sample (TrainingSession.sample) takes a reference image for VACE: the clip comes out at its own
    length (the reference frame dropped), and another reference gives another clip."""
    from trainer.session import TrainingSession

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, p in enumerate(sorted(clips.glob("*.mp4"))):
        _frames(1, seed=40 + i)[0].save(refs / f"{p.stem}.png")
    d = _video_job(wan_vace, clips, tmp_path / "out", steps=1, cache_text_embeddings=True, disable_sampling=True)
    d["config"]["process"][0]["datasets"][0]["reference_path"] = str(refs)
    s = TrainingSession(d, report=quiet)
    s.advance(1)
    red, blue = torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)
    red[0], blue[2] = 1.0, 1.0
    a = s.sample("a red circle", 32, 32, 2, 1.0, seed=3, frames=5, reference=red)
    b = s.sample("a red circle", 32, 32, 2, 1.0, seed=3, frames=5, reference=blue)
    assert a.shape == b.shape == (3, 5, 32, 32) and torch.isfinite(a).all()
    assert float((a - b).abs().max()) > 1e-4


# --- Wan 2.2 A14B experts ---------------------------------------------------------------------------------------

def _sigmas_seen(trainer) -> list[float]:
    """Every training noise level of the run, as the loop draws them."""
    seen: list[float] = []
    draw = trainer.train_sigmas

    def record(*args, **kwargs):
        s = draw(*args, **kwargs)
        seen.extend(s.tolist())
        return s

    trainer.train_sigmas = record
    trainer.train()
    return seen


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_expert_trains_its_share_of_the_schedule_and_names_its_lora(wan_t2v, clips, tmp_path, expert):
    d = _video_job(wan_t2v, clips, tmp_path / "out", steps=4, cache_text_embeddings=True, timestep_type="sigmoid")
    d["config"]["process"][0]["model"]["expert"] = expert
    job = load_job_dict(d)
    assert job.process.model.expert_boundary == 0.875 and job.name == f"run_{expert}"  # Wan 2.2 T2V's boundary
    seen = _sigmas_seen(build_trainer(job, report=quiet))
    assert len(seen) == 4
    assert all(s >= 0.875 for s in seen) if expert == "high_noise" else all(s < 0.875 for s in seen), seen
    assert (tmp_path / "out" / f"run_{expert}" / f"run_{expert}.safetensors").is_file()

    # the family's own distribution spans both sides of the boundary: the window is what kept the expert to its own
    trainer = build_trainer(load_job_dict(_video_job(wan_t2v, clips, tmp_path / "whole", steps=1,
                                                     timestep_type="sigmoid")), report=quiet)
    drawn = trainer.model.train_sigmas("sigmoid", 4000, torch.Generator().manual_seed(0), (4000, 16, 2, 4, 4))
    assert (drawn >= 0.875).sum() > 20 and (drawn < 0.875).sum() > 20


def test_expert_boundary_defaults_per_variant_and_keys_are_checked(wan_t2v, wan_i2v, tiny_flux, clips, tmp_path):
    i2v = _video_job(wan_i2v, clips, tmp_path / "i2v", steps=1)
    i2v["config"]["process"][0]["model"].update(arch="wan21_i2v", expert="low_noise")
    i2v["config"]["process"][0]["datasets"][0]["do_i2v"] = True
    assert load_job_dict(i2v).process.model.expert_boundary == 0.9  # Wan 2.2 I2V's boundary
    own = _video_job(wan_t2v, clips, tmp_path / "own", steps=1)
    own["config"]["process"][0]["model"].update(expert="high_noise", expert_boundary=0.8)
    assert load_job_dict(own).process.model.expert_boundary == 0.8
    lone = _video_job(wan_t2v, clips, tmp_path / "lone", steps=1)
    lone["config"]["process"][0]["model"]["expert_boundary"] = 0.8
    with pytest.raises(ConfigError, match=r"model\.expert_boundary: set model\.expert"):
        load_job_dict(lone)
    flux = job_dict(tiny_flux, clips, tmp_path / "flux")
    flux["config"]["process"][0]["model"]["expert"] = "high_noise"
    with pytest.raises(ConfigError, match=r"model\.expert: not used by model\.arch 'flux'"):
        load_job_dict(flux)
    bad = _video_job(wan_t2v, clips, tmp_path / "bad", steps=1)
    bad["config"]["process"][0]["model"]["expert"] = "middle"
    with pytest.raises(ConfigError, match=r"model\.expert: expected one of high_noise, low_noise"):
        load_job_dict(bad)


def test_wan22_files_this_loader_cannot_train_are_named():
    from trainer.models.wan import refuse_wan22_only

    refuse_wan22_only(Path("t2v.safetensors"), {"in_channels": 16, "out_channels": 16}, "t2v")  # Wan 2.1 / 2.2 A14B T2V
    refuse_wan22_only(Path("i2v.safetensors"), {"in_channels": 36, "out_channels": 16}, "i2v")  # Wan 2.1 I2V
    with pytest.raises(ModelFileError, match=r"5b\.safetensors: Wan 2\.2 TI2V 5B .*ComfyUI's MODEL"):
        refuse_wan22_only(Path("5b.safetensors"), {"in_channels": 48, "out_channels": 48}, "t2v")
    with pytest.raises(ModelFileError, match=r"a14b\.safetensors: an image-to-video Wan .*36 input channels"):
        refuse_wan22_only(Path("a14b.safetensors"), {"in_channels": 36, "out_channels": 16}, "t2v")
