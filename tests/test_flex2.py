"""Flex.2: loading from the original layout, the 49-channel input against the reference pipeline's math,
control images through dataset, cache, batch and samples, and training end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import TINY_FLUX, job_dict, make_images, quiet, write_tiny_flux
from trainer.config import DatasetConfig, ModelConfig, load_job_dict
from trainer.data.cache import LatentCache, sample_conditions
from trainer.data.dataset import BatchItem, BatchPlan, image_pixels, scan_dataset
from trainer.errors import ConfigError, DatasetError, ModelFileError
from trainer.job import build_trainer, run_job
from trainer.previews import prepare_samples
from trainer.models import registry
from trainer.models.flux import FluxModel
from trainer.models.flux_layout import diffusers_to_original
from trainer.models.files import load_state_dict
from trainer.sampling import denoise, initial_noise


@pytest.fixture(scope="module")
def tiny_flex2(tmp_path_factory) -> dict:
    """A tiny Flex.2 (img_in 196 features in, 64 out) beside the tiny Flux's encoders, in the files users keep."""
    from trainer.demo import tiny
    from trainer.demo import flux as demo_flux

    folder = tmp_path_factory.mktemp("tiny_flex2")
    cfg = write_tiny_flux(folder)
    flex = demo_flux.flux_diffusers_config(guidance=True, in_channels=196, **TINY_FLUX)
    flex.update(out_channels=64, num_layers=2)  # two double blocks: Flex.2 has fewer double blocks than Flux
    demo_flux.make_flux_file(folder / "flex2.safetensors", flex, seed=11, dtype=torch.float32)
    return dict(cfg, arch="flex2", name_or_path=str(folder / "flex2.safetensors"))


def _load(cfg: dict, arch: str = "flex2"):
    mc = ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"})
    return registry.get_family(arch).load(mc, "cpu", torch.float32)


@pytest.fixture(scope="module")
def flex2(tiny_flex2) -> FluxModel:
    return _load(tiny_flex2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _control_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A line-drawing-like control image: white strokes on black."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, (0, 0, 0))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, min(size), 4))
        d.line([x0, y0, x1, y1], fill=(255, 255, 255), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _controls_for(images: Path, folder: Path, size=(48, 40), seed: int = 0) -> Path:
    for i, p in enumerate(sorted(images.glob("*.png"))):
        _control_image(folder / p.name, size, seed + i)
    return folder


# --- loading ---------------------------------------------------------------------------------------

def test_loads_flex2_file(flex2, tiny_flex2):
    cfg = flex2.denoiser.config
    assert (cfg.in_channels, cfg.out_channels, cfg.num_layers) == (196, 64, 2)
    assert flex2.arch == "flex2" and flex2.latent_channels() == 16 and flex2.takes_control
    assert flex2.bypass_guidance  # trained with the guidance embedding bypassed by default
    assert flex2.vae.config.latent_channels == 16
    # the original layout round-trips through the diffusers module
    original = load_state_dict(Path(tiny_flex2["name_or_path"]))
    back = diffusers_to_original(flex2.denoiser.state_dict(), dict(cfg))
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    # LoRA targets: ComfyUI's Flux keys of the blocks; img_in (the 196-wide input) is not a default target
    keys = {t.key for t in flex2.targets()}
    assert "diffusion_model.double_blocks.1.img_attn.qkv" in keys and "diffusion_model.single_blocks.0.linear1" in keys
    assert not any("img_in" in k for k in keys)
    md = flex2.save_metadata()
    assert md["ss_base_model_version"] == "flex2" and md["eridiffusion.arch"] == "flex2"


def test_loads_diffusers_folder(flex2, tiny_flex2, tmp_path):
    folder = tmp_path / "Flex.2-local"
    flex2.denoiser.save_pretrained(str(folder / "transformer"))
    (folder / "model_index.json").write_text('{"_class_name": "Flex2Pipeline"}')
    model = _load(dict(tiny_flex2, name_or_path=str(folder)))
    assert model.arch == "flex2" and model.takes_control and model.denoiser.config.in_channels == 196
    for k, v in flex2.denoiser.state_dict().items():
        assert torch.equal(model.denoiser.state_dict()[k], v), k


def test_arch_and_file_must_agree(tiny_flex2, tiny_flux):
    with pytest.raises(ModelFileError, match="use model.arch flex2"):
        _load(dict(tiny_flex2, arch="flux"), "flux")
    with pytest.raises(ModelFileError, match="not a Flex.2 checkpoint .a Flux-style checkpoint"):
        _load(dict(tiny_flux, arch="flex2"))


# --- the model's input against the reference pipeline's math -------------------------------------

def _reference_sample(model: FluxModel, noise, cond, control, steps: int, guidance: float, inpaint=None,
                      mask=None, strength: float = 1.0, stop: float = 1.0) -> torch.Tensor:
    """Flex2Pipeline's loop written with diffusers' Flux parts: the noisy latent and the 33 extra channels
    (inpaint latent zeroed under the mask or 0, the mask or 1, the control latent times control_strength or 0)
    packed separately and concatenated on the feature axis, the control's channels zeroed from step
    int(steps * control_stop) on, Flux's dynamic shift, timestep / 1000, guidance through the embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    b, c, h, w = noise.shape
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    latents = FluxPipeline._pack_latents(noise, b, c, h, w)
    ctrl = torch.zeros_like(noise) if control is None else control * strength
    m = torch.ones_like(noise[:, :1]) if mask is None else mask
    inp = torch.zeros_like(noise) if inpaint is None else inpaint * (1 - m)
    extra = FluxPipeline._pack_latents(torch.cat([inp, m, ctrl], dim=1), b, 33, h, w)
    no_control = FluxPipeline._pack_latents(torch.cat([inp, m, torch.zeros_like(noise)], dim=1), b, 33, h, w)
    mu = calculate_shift(latents.shape[1], 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt = cond["t5"]
    cutoff = int(len(sched.timesteps) * stop)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = model.denoiser(
                hidden_states=torch.cat([latents, extra if i < cutoff else no_control], dim=2),
                timestep=t.expand(b) / 1000, guidance=torch.full((b,), guidance), pooled_projections=cond["pooled"],
                encoder_hidden_states=txt, txt_ids=torch.zeros(txt.shape[1], 3), img_ids=img_ids, return_dict=False,
            )[0]
            latents = sched.step(out, t, latents, return_dict=False)[0]
    return FluxPipeline._unpack_latents(latents, h * 8, w * 8, 8)


def test_sampler_matches_reference_pipeline_math(flex2, tmp_path):
    cond = flex2.encode_text(["a red circle"])
    noise = initial_noise(flex2, 32, 24, seed=3)
    control = sample_conditions(flex2, str(_control_image(tmp_path / "c.png", (40, 30), 1)), 32, 24, 1, "k")["control"]
    assert control.shape == noise.shape
    steps, guidance = 4, 3.5
    results = {}
    for name, ctrl in (("control", control), ("none", None)):
        c = dict(cond, control=ctrl) if ctrl is not None else cond
        ours = denoise(flex2, noise, c, None, steps, guidance)
        theirs = _reference_sample(flex2, noise, cond, ctrl, steps, guidance)
        err = rel_err(ours, theirs)
        assert err < 1e-3, (name, err)
        results[name] = ours
    assert rel_err(results["control"], results["none"]) > 1e-3  # the control channels reach the model


def _mask_image(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    """White (paint) inside `box`, black (keep) elsewhere."""
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).rectangle(box, fill=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_inpaint_strength_and_stop_match_reference_pipeline_math(flex2, tmp_path):
    """A preview with an image to inpaint, its mask, control_strength and control_stop gives the pipeline's
    latents: the inpaint latent zeroed under the bilinear-resized mask, the control scaled, then dropped."""
    import torch.nn.functional as F

    cond = flex2.encode_text(["a red circle"])
    noise = initial_noise(flex2, 32, 24, seed=3)
    ctrl_path = str(_control_image(tmp_path / "c.png", (32, 24), 1))
    image = make_images(tmp_path / "img", n=1, size=(32, 24), seed=5)
    image_path = str(next(image.glob("*.png")))
    mask_path = str(_mask_image(tmp_path / "m.png", (32, 24), (8, 4, 20, 15)))
    extra = sample_conditions(flex2, ctrl_path, 32, 24, 1, "k", inpaint=(image_path, mask_path))
    # the reference's inputs, made the pipeline's way: the image's latent, the mask's first channel in [0, 1] resized
    latent = flex2.encode_pixels(image_pixels(Path(image_path), (32, 24))[None])
    mask = torch.from_numpy(np.asarray(Image.open(mask_path).convert("RGB"), dtype=np.float32)[..., 0] / 255)
    mask = F.interpolate(mask[None, None], size=noise.shape[-2:], mode="bilinear", align_corners=False)
    steps, guidance = 4, 3.5
    outs = {}
    for strength, stop in ((1.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
        c = dict(cond, **extra, control_strength=torch.tensor([strength]), control_stop=torch.tensor([stop]))
        ours = denoise(flex2, noise, c, None, steps, guidance)
        theirs = _reference_sample(flex2, noise, cond, extra["control"], steps, guidance, latent, mask, strength, stop)
        assert rel_err(ours, theirs) < 1e-3, (strength, stop, rel_err(ours, theirs))
        outs[(strength, stop)] = ours
    plain = denoise(flex2, noise, dict(cond, control=extra["control"]), None, steps, guidance)
    assert rel_err(outs[(1.0, 1.0)], plain) > 1e-3  # the inpaint inputs reach the model
    assert rel_err(outs[(0.5, 0.5)], outs[(1.0, 1.0)]) > 1e-3  # and strength / stop change what they say
    no_control = denoise(flex2, noise, {**cond, **{k: v for k, v in extra.items() if k != "control"}}, None, steps,
                         guidance)
    assert rel_err(outs[(1.0, 0.0)], no_control) < 1e-6  # control_stop 0: no step sees the control


def test_guidance_bypassed_in_training_only(flex2):
    x, s = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    cond = {"t5": torch.randn(1, 8, 32), "pooled": torch.randn(1, 64)}
    with torch.no_grad():
        sampling = [flex2.predict(x, s, cond, guidance=g) for g in (1.0, 5.0)]
        flex2.set_train_hooks(True)
        training = [flex2.predict(x, s, cond, guidance=g) for g in (1.0, 5.0)]
        flex2.set_train_hooks(False)
    assert not torch.allclose(sampling[0], sampling[1])
    torch.testing.assert_close(training[0], training[1])
    assert training[0].shape == x.shape


# --- control images in the data --------------------------------------------------------------------

def test_dataset_controls_cached_with_latents(flex2, tmp_path):
    images = make_images(tmp_path / "data", n=2, size=(32, 32))
    controls = _controls_for(images, tmp_path / "ctrl")
    cfg = DatasetConfig(folder_path=str(images), control_path=str(controls), resolution=[32], flip_x=True,
                        cache_latents_to_disk=True)
    ds = scan_dataset(cfg, 0, None, flex2.pixel_factor)
    assert [m.control.name for m in ds.media] == ["img_0.png", "img_1.png"]
    cache = LatentCache([ds], flex2.latent_cache_id())
    cache.prepare(flex2)
    for e in ds.entries:
        im = ds.media[e.item]
        # resized / cropped to the image's bucket and mirrored with it, encoded like the latents
        want = flex2.encode_pixels(image_pixels(im.control, e.bucket, e.flip)[None])[0]
        got = cache.get_control(0, e, flex2)
        assert got.shape == cache.get(0, e, flex2).shape == (16, 16, 16)  # the tiny VAE downsamples by 2
        torch.testing.assert_close(got, want)
        saved = load_file(str(cache.disk_path(ds, e)))
        assert torch.equal(saved["cond.control"], got) and torch.equal(saved["latent"], cache.mem[cache.key(ds, e)])
    flipped = [cache.get_control(0, e, flex2) for e in ds.entries if e.item == 0]
    assert not torch.allclose(flipped[0], flipped[1])
    # a changed control image is a new cache entry, never the stale one
    key = cache.key(ds, ds.entries[0])
    _control_image(controls / "img_0.png", (48, 40), 99)
    ds2 = scan_dataset(cfg, 0, None, flex2.pixel_factor)
    assert LatentCache([ds2], flex2.latent_cache_id()).key(ds2, ds2.entries[0]) != key


def test_control_errors(flex2, tiny_flux, tmp_path):
    images = make_images(tmp_path / "data", n=3, size=(32, 32))
    controls = _controls_for(images, tmp_path / "ctrl")
    (controls / "img_1.png").unlink()
    cfg = DatasetConfig(folder_path=str(images), control_path=str(controls), resolution=[32])
    with pytest.raises(DatasetError, match=r"datasets\[0\].control_path: 1 images have no control image .*\(img_1.png\)"):
        scan_dataset(cfg, 0, None, 16)
    with pytest.raises(DatasetError, match="control_path: folder .* does not exist"):
        scan_dataset(DatasetConfig(folder_path=str(images), control_path=str(tmp_path / "nope")), 0, None, 16)
    _control_image(controls / "img_1.png", (32, 32), 5)
    (controls / "img_2.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="control image .*img_2.png cannot be read"):
        scan_dataset(cfg, 0, None, 16)
    _control_image(controls / "img_2.png", (32, 32), 6)
    ds = scan_dataset(cfg, 0, None, 16)
    flux = _load(tiny_flux, "flux")
    with pytest.raises(DatasetError, match="model.arch 'flux' takes no control images"):
        LatentCache([ds], "x").prepare(flux)
    with pytest.raises(ConfigError, match=r"samples\[0\]\.control_image: model.arch 'flux' takes no control image"):
        sample_conditions(flux, str(controls / "img_0.png"), 32, 32, 1, "sample.samples[0]")
    with pytest.raises(ConfigError, match="control image .* does not exist"):
        sample_conditions(flex2, str(tmp_path / "missing.png"), 32, 32, 1, "sample.samples[0]")


def test_batch_controls_dropout_and_mixed_datasets(flex2, tmp_path):
    a = make_images(tmp_path / "a", n=2, size=(32, 32))
    b = make_images(tmp_path / "b", n=2, size=(32, 32), seed=1)
    ctrl = _controls_for(a, tmp_path / "ctrl")
    ds_a = scan_dataset(DatasetConfig(folder_path=str(a), control_path=str(ctrl), resolution=[32]), 0, None, 16)
    ds_b = scan_dataset(DatasetConfig(folder_path=str(b), resolution=[32]), 1, None, 16)
    cache = LatentCache([ds_a, ds_b], flex2.latent_cache_id())
    cache.prepare(flex2)
    batch = [BatchItem(0, ds_a.entries[0]), BatchItem(1, ds_b.entries[0]), BatchItem(0, ds_a.entries[1])]
    out = cache.conditions_for_batch(batch, flex2, seed=0, index=0)["control"]
    assert out.shape == (3, 16, 16, 16)
    assert torch.equal(out[0], cache.get_control(0, ds_a.entries[0], flex2))
    assert torch.equal(out[1], torch.zeros(16, 16, 16))  # no control image: Flex.2's "no control" input
    assert cache.conditions_for_batch(batch[1:2], flex2, 0, 0) == {}  # no control anywhere: nothing to add
    ds_a.cfg.control_dropout = 1.0
    assert torch.equal(cache.conditions_for_batch(batch, flex2, 0, 0)["control"], torch.zeros(3, 16, 16, 16))
    ds_a.cfg.control_dropout = 0.5
    plan = BatchPlan([ds_a], 1, 0)
    kept = [bool(cache.conditions_for_batch(plan.batch(i), flex2, 0, i)["control"].abs().sum() > 0) for i in range(40)]
    assert 8 < sum(kept) < 32  # about half, and a pure function of (seed, index)
    assert kept == [bool(cache.conditions_for_batch(plan.batch(i), flex2, 0, i)["control"].abs().sum() > 0) for i in range(40)]


# --- training and samples end to end ----------------------------------------------------------------

def _job(cfg: dict, images: Path, out: Path, name: str, controls: Path | None = None, dropout: float = 0.0) -> dict:
    d = job_dict(cfg, images, out, name=name, steps=2, cache_text_embeddings=True, disable_sampling=True)
    if controls is not None:
        d["config"]["process"][0]["datasets"][0].update(control_path=str(controls), control_dropout=dropout)
    return d


def test_training_uses_control_and_saves_comfyui_keys(tiny_flex2, tmp_path):
    images = make_images(tmp_path / "data", n=2, size=(32, 32))
    ctrl = _controls_for(images, tmp_path / "ctrl")
    other = _controls_for(images, tmp_path / "ctrl2", seed=50)
    runs = {
        "control": _job(tiny_flex2, images, tmp_path / "out", "control", ctrl),
        "other": _job(tiny_flex2, images, tmp_path / "out", "other", other),
        "dropped": _job(tiny_flex2, images, tmp_path / "out", "dropped", ctrl, dropout=1.0),
        "plain": _job(tiny_flex2, images, tmp_path / "out", "plain"),
    }
    weights = {}
    for name, d in runs.items():
        assert run_job(load_job_dict(d), report=quiet).step == 2
        path = tmp_path / "out" / name / f"{name}.safetensors"
        weights[name] = load_file(str(path))
    with safe_open(str(tmp_path / "out" / "control" / "control.safetensors"), "pt") as f:
        assert f.metadata()["eridiffusion.arch"] == "flex2"
    keys = set(weights["control"])
    assert "diffusion_model.double_blocks.1.img_attn.qkv.lora_down.weight" in keys
    assert not any("img_in" in k for k in keys)

    def differ(a: str, b: str) -> bool:
        return any(not torch.equal(weights[a][k], weights[b][k]) for k in keys)

    assert differ("control", "other")  # the control latents reach the model in training
    assert not differ("dropped", "plain")  # a dropped control is exactly "no control" (zeros)
    assert differ("control", "plain")


def test_samples_take_a_control_image(tiny_flex2, tmp_path):
    images = make_images(tmp_path / "data", n=1, size=(32, 32))
    c = _control_image(tmp_path / "c.png", (64, 64), 3)
    d = job_dict(tiny_flex2, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["sample"] = {"width": 32, "height": 48, "sample_steps": 2, "samples": [
        {"prompt": "a cat", "ctrl_img": str(c)}, {"prompt": "a dog"}]}
    trainer = build_trainer(load_job_dict(d), report=quiet)
    samples = trainer.samples
    assert samples[0].request.cond["control"].shape == (1, 16, 24, 16)  # 48 x 32 pixels, VAE factor 2
    assert "control" not in samples[1].request.cond
    with_ctrl, without = trainer.sample()
    assert with_ctrl.size == without.size == (32, 48)
    d["config"]["process"][0]["sample"]["samples"][0]["ctrl_img"] = str(tmp_path / "nope.png")
    with pytest.raises(ConfigError, match=r"sample.samples\[0\].control_image: control image .* does not exist"):
        prepare_samples(load_job_dict(d), trainer.model)


def _masks_for(images: Path, folder: Path, boxes) -> Path:
    for p, box in zip(sorted(images.glob("*.png")), boxes):
        _mask_image(folder / p.name, (32, 32), box)
    return folder


def test_masks_train_inpainting_and_mixed_batches_read_no_inpaint(tiny_flex2, flex2, tmp_path):
    """datasets[].mask_path trains the inpaint input (the item's latent under its mask): a run with masks differs
    from one without and from one with other masks; in a batch mixing items with and without masks, the maskless
    get Flex.2's "no inpaint" (zero latent, mask of ones)."""
    images = make_images(tmp_path / "data", n=2, size=(32, 32))
    masks = _masks_for(images, tmp_path / "masks", [(0, 0, 15, 31), (8, 8, 24, 24)])
    other = _masks_for(images, tmp_path / "masks2", [(16, 0, 31, 31), (0, 0, 8, 8)])
    runs = {"masked": masks, "other": other, "plain": None}
    weights = {}
    for name, m in runs.items():
        d = _job(tiny_flex2, images, tmp_path / "out", name)
        if m is not None:
            d["config"]["process"][0]["datasets"][0]["mask_path"] = str(m)
        assert run_job(load_job_dict(d), report=quiet).step == 2
        weights[name] = load_file(str(tmp_path / "out" / name / f"{name}.safetensors"))
    keys = set(weights["plain"])
    assert any(not torch.equal(weights["masked"][k], weights["plain"][k]) for k in keys)
    assert any(not torch.equal(weights["masked"][k], weights["other"][k]) for k in keys)

    ds_a = scan_dataset(DatasetConfig(folder_path=str(images), mask_path=str(masks), resolution=[32]), 0, None, 16)
    ds_b = scan_dataset(DatasetConfig(folder_path=str(make_images(tmp_path / "b", n=1, size=(32, 32), seed=3)),
                                      resolution=[32]), 1, None, 16)
    cache = LatentCache([ds_a, ds_b], flex2.latent_cache_id())
    cache.prepare(flex2)
    batch = [BatchItem(0, ds_a.entries[0]), BatchItem(1, ds_b.entries[0])]
    out = cache.conditions_for_batch(batch, flex2, seed=0, index=0)
    assert set(out) == {"inpaint", "inpaint_keep"}
    lat = cache.get(0, ds_a.entries[0], flex2)
    keep = out["inpaint_keep"][0]
    assert 0 < float(keep.mean()) < 1 and torch.allclose(out["inpaint"][0], lat * keep)
    assert torch.equal(out["inpaint"][1], torch.zeros_like(lat)) and torch.equal(out["inpaint_keep"][1],
                                                                                 torch.zeros_like(keep))
    x = torch.randn(2, 16, 16, 16)
    composed = flex2.variant.compose_input(x, out)
    assert torch.equal(composed[1, 32], torch.ones(16, 16))  # "no inpaint": the model paints everywhere


def test_inpaint_sample_options(tiny_flex2, tiny_flux, tmp_path):
    images = make_images(tmp_path / "data", n=1, size=(32, 32))
    mask = _mask_image(tmp_path / "m.png", (32, 32), (0, 0, 15, 15))
    image = next(images.glob("*.png"))
    d = job_dict(tiny_flex2, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["sample"] = {"width": 32, "height": 32, "sample_steps": 2, "samples": [
        {"prompt": "a cat", "inpaint_image": str(image), "inpaint_mask": str(mask), "control_strength": 0.5,
         "control_stop": 0.5}]}
    trainer = build_trainer(load_job_dict(d), report=quiet)
    cond = trainer.samples[0].request.cond
    assert cond["inpaint"].shape == (1, 16, 16, 16) and cond["inpaint_keep"].shape == (1, 1, 16, 16)
    assert float(cond["control_strength"]) == 0.5 and float(cond["control_stop"]) == 0.5
    assert trainer.sample()[0].size == (32, 32)
    del d["config"]["process"][0]["sample"]["samples"][0]["inpaint_mask"]
    with pytest.raises(ConfigError, match=r"samples\[0\]\.inpaint_mask: inpaint_image needs inpaint_mask"):
        load_job_dict(d)
    f = job_dict(tiny_flux, images, tmp_path / "out", steps=1)
    f["config"]["process"][0]["sample"] = {"samples": [{"prompt": "a", "control_stop": 0.5}]}
    with pytest.raises(ConfigError, match=r"samples\[0\]\.control_stop: model.arch 'flux' takes no control_stop"):
        load_job_dict(f)
    f["config"]["process"][0]["sample"] = {}
    f["config"]["process"][0]["datasets"][0]["mask_path"] = str(tmp_path)
    with pytest.raises(ConfigError, match=r"mask_path: model.arch 'flux' takes no masks \(flex2, wan21_vace do\)"):
        load_job_dict(f)
