"""OmniGen2 family: config from shapes (real size too), loading, Qwen2.5 text as ComfyUI encodes it, the trimmed
padding, ComfyUI's simple schedule, text-to-image and edit training (reference latents from control_path) whose LoRA
merged into the original weights computes what the trainer computed, and resume. The transformer itself is proven
equal to ComfyUI's in tests/integration/test_comfyui_omnigen2_model.py, the prompt encoding (token ids, valid hidden
states, mask lengths) in tests/integration/test_comfyui_omnigen2_text.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_family_resumes, job_dict, make_images, merge_lora, quiet
from trainer.config import ModelConfig, load_job_dict
from trainer.demo.omnigen2 import omnigen2_config, write_omnigen2_files
from trainer.errors import ModelFileError
from trainer.fileio import save_safetensors_atomic
from trainer.job import build_trainer
from trainer.models.files import load_state_dict, safetensors_shapes
from trainer.models.omnigen2 import TEMPLATE, load_omnigen2, transformer_config
from trainer.models.schedules import comfy_simple_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def og(tmp_path_factory) -> dict:
    return write_omnigen2_files(tmp_path_factory.mktemp("omnigen2"), omnigen2_config())


@pytest.fixture(scope="module")
def model(og):
    return _load(og)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("og_data")
    make_images(root / "control", n=3, size=(32, 32), captions=False, seed=9)
    return make_images(root / "data", n=3, size=(32, 32))


def _load(cfg: dict, dtype=torch.float32, **over):
    return load_omnigen2(ModelConfig(**{**{k: v for k, v in cfg.items() if k != "arch"}, **over}),
                         torch.device("cpu"), dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_real_size_config_from_shapes():
    """ComfyUI's full-size OmniGen2 (meta device): the config read from its shapes builds the same key set, and the
    targets are every block linear of the four stacks (the context refiner has no modulation)."""
    from trainer.models.omnigen2 import omnigen2_targets
    from trainer.models.omnigen2_transformer import OmniGen2Transformer

    with torch.device("meta"):
        real = OmniGen2Transformer()
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    cfg = transformer_config(shapes, "full")
    assert (cfg["hidden_size"], cfg["num_layers"], cfg["num_refiner_layers"], cfg["num_attention_heads"],
            cfg["num_kv_heads"], cfg["text_feat_dim"]) == (2520, 32, 2, 21, 7, 2048)
    with torch.device("meta"):
        again = OmniGen2Transformer(**cfg)
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == shapes
    keys = [t.key for t in omnigen2_targets(real)]
    assert len(keys) == 32 * 8 + 2 * 8 + 2 * 8 + 2 * 7
    assert all(f"{k.removeprefix('diffusion_model.')}.weight" in shapes for k in keys)
    assert "diffusion_model.context_refiner.1.feed_forward.linear_3" in keys
    assert "diffusion_model.ref_image_refiner.0.norm1.linear" in keys


def test_loads_and_refuses_clearly(og, model, tiny_flux, tmp_path):
    sd = load_state_dict(Path(og["name_or_path"]))
    ours = model.denoiser.state_dict()
    assert set(ours) == set(sd) and all(torch.equal(ours[k], sd[k]) for k in sd)
    prefixed = tmp_path / "prefixed.safetensors"
    save_safetensors_atomic({f"model.diffusion_model.{k}": v for k, v in sd.items()}, prefixed)
    again = _load(dict(og, name_or_path=str(prefixed))).denoiser.state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    with pytest.raises(ModelFileError, match="flux checkpoint, but model.arch is 'omnigen2'"):
        _load(dict(og, name_or_path=tiny_flux["name_or_path"]))
    with pytest.raises(ModelFileError, match="OmniGen2 needs Qwen2.5-VL-3B"):
        _load(dict(og, text_encoder_paths=[]))


def test_qwen_file_loads_as_transformers_builds_it(og, model):
    """The language model read from ComfyUI-style file (config from shapes; the vision tensor skipped) computes what
    transformers' own Qwen2Model with those weights computes."""
    from transformers import Qwen2Config, Qwen2Model

    sd = {k: v for k, v in load_state_dict(Path(og["text_encoder_paths"][0]), prefix="model.").items()}
    cfg = Qwen2Config(vocab_size=sd["embed_tokens.weight"].shape[0], hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=128,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ref = Qwen2Model(cfg).eval()
    ref.load_state_dict(sd)
    ids = torch.tensor([[3, 5, 9, 14, 20]])
    with torch.no_grad():
        want, got = ref(ids)[0], model.qwen(ids)[0]
    assert want.abs().mean() > 0.1 and rel_err(got, want) < 1e-6


def test_prompt_encoding_is_comfyuis_template_and_padding_changes_nothing(model):
    """Each caption in the chat template, no special tokens added; the padded batch's valid states are what the
    caption alone computes (ComfyUI encodes each prompt at its own length), and the model's output for a padded
    caption equals the unpadded one's."""
    captions = ["a red circle on a blue background", "sks dog"]
    cond = model.encode_text(captions)
    assert cond["context"].shape == (2, 256, 64) and cond["mask"].shape == (2, 256)
    for i, c in enumerate(captions):
        ids = model.tokenizer(TEMPLATE.format(c), add_special_tokens=False, return_tensors="pt").input_ids
        assert ids[0, 0] == model.tokenizer.convert_tokens_to_ids("<|im_start|>")
        n = ids.shape[1]
        assert int(cond["mask"][i].sum()) == n
        with torch.no_grad():
            alone = model.qwen(ids)[0]
        assert rel_err(cond["context"][i, :n], alone[0]) < 1e-5
    g = torch.Generator().manual_seed(0)
    noisy, sigma = torch.randn(1, 16, 6, 4, generator=g), torch.tensor([0.7])
    one = {k: v[1:] for k, v in cond.items()}
    n = int(one["mask"].sum())
    with torch.no_grad():
        padded = model.predict(noisy, sigma, one)
        trimmed = model.predict(noisy, sigma, {"context": one["context"][:, :n], "mask": one["mask"][:, :n]})
        both = model.predict(noisy.expand(2, -1, -1, -1), sigma, cond)
    assert rel_err(padded, trimmed) < 1e-6 and rel_err(both[1:], trimmed) < 1e-5


def test_sample_sigmas_are_comfyuis_simple_schedule(model):
    """ComfyUI's simple scheduler over ModelSamplingDiscreteFlow(shift 2.6): table[-1 - int(i * 1000 / steps)]."""
    s = comfy_simple_sigmas(4, 2.6)
    t = torch.tensor([1000, 750, 500, 250]) / 1000.0
    assert torch.allclose(s[:-1], 2.6 * t / (1 + 1.6 * t)) and s[-1] == 0
    assert torch.equal(model.sample_sigmas(4, (1, 16, 8, 8)), s)
    assert len(comfy_simple_sigmas(3, 2.6)) == 4 and float(comfy_simple_sigmas(3, 2.6)[1]) == pytest.approx(
        2.6 * 0.667 / (1 + 1.6 * 0.667), rel=1e-6)


def test_a_reference_is_used_and_zero_references_are_none(model):
    g = torch.Generator().manual_seed(1)
    noisy, sigma = torch.randn(2, 16, 6, 4, generator=g), torch.tensor([0.5, 0.5])
    cond = model.encode_text(["a cat", "a dog"])
    ref = torch.randn(2, 16, 6, 4, generator=g)
    with torch.no_grad():
        plain = model.predict(noisy, sigma, cond)
        with_ref = model.predict(noisy, sigma, dict(cond, control=ref))
        mixed = model.predict(noisy, sigma, dict(cond, control=torch.stack([ref[0], torch.zeros_like(ref[1])])))
    assert rel_err(with_ref, plain) > 1e-2
    assert rel_err(mixed[0], with_ref[0]) < 1e-5 and rel_err(mixed[1], plain[1]) < 1e-5


@pytest.mark.parametrize("edit", [False, True])
def test_trains_and_the_merged_lora_computes_the_same(og, data, tmp_path, edit):
    d = job_dict(og, data, tmp_path / "out", steps=2, cache_text_embeddings=True)
    p = d["config"]["process"][0]
    p["sample"].update(sample_steps=2, width=32, height=32)
    if edit:
        p["datasets"][0]["control_path"] = str(data.parent / "control")
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train()
    run = tmp_path / "out" / "run"
    sd = load_file(str(run / "run.safetensors"))
    assert "diffusion_model.layers.1.attn.to_q.lora_down.weight" in sd
    assert "diffusion_model.context_refiner.0.feed_forward.linear_2.lora_up.weight" in sd
    trained = {k for k in sd if k.startswith("diffusion_model.ref_image_refiner.") and k.endswith("lora_up.weight")}
    # the reference refiner only learns when references are trained on
    assert trained and (any(sd[k].abs().max() > 0 for k in trained) == edit)

    g = torch.Generator().manual_seed(5)
    noisy, sigmas = torch.randn(1, 16, 6, 4, generator=g), torch.tensor([0.6])
    cond = trainer.model.encode_text(["a red cat"]) if trainer.model.text_encoders_loaded() else \
        _load(og).encode_text(["a red cat"])
    if edit:
        cond["control"] = torch.randn(1, 16, 6, 4, generator=g)
    merged = tmp_path / "merged.safetensors"
    save_safetensors_atomic(merge_lora(load_state_dict(Path(og["name_or_path"])), sd), merged)
    with torch.no_grad():
        ours = trainer.model.predict(noisy, sigmas, cond)
        base = _load(og).predict(noisy, sigmas, cond)
        theirs = _load(dict(og, name_or_path=str(merged))).predict(noisy, sigmas, cond)
    err, effect = rel_err(theirs, ours), rel_err(ours, base)
    assert err < 1e-4 and effect > 100 * err, (err, effect)


def test_resume_matches_uninterrupted(og, data, tmp_path):
    assert_family_resumes(og, data, tmp_path)


def test_demo_files_are_detected_as_omnigen2(tmp_path):
    from trainer.demo.omnigen2 import write_omnigen2_demo
    from trainer.models.detect import guess_family

    cfg = write_omnigen2_demo(tmp_path)
    assert guess_family(safetensors_shapes(Path(cfg["name_or_path"]))) == "omnigen2"
