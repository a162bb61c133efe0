"""Training on ComfyUI's own MODEL, for Flux, SDXL (a UNet family), Wan 2.1 (a video family), OmniGen2 and the families
built small from ComfyUI's own model classes (comfy_small_<name>.py: Z-Image, Chroma, SD 3.5 ...): the LoRA
the trainer saves loads back through ComfyUI's LoRA loader with no "lora key not loaded", patches one weight
per trained layer, and ComfyUI's patched model gives the output the trainer's model gave at the end of
training (max relative error < 1e-3, fp32). Gradient checkpointing on ComfyUI's own blocks recomputes them and
gives the same LoRA gradients (< 1e-3; Flux exactly, SDXL 1.7e-4: CPU attention picks other kernels without grad).
The conditioning reaches the model: the trained model's output changes with the caption.

OmniGen2 (ComfyUI fixes its config at full size, so its own Omnigen2 model is built small: comfy_check_train.py)
trains with batch size 2 on two captions of different token lengths, each at its own length (ComfyUI's attention mask
all ones, as its text encoder gives it): ComfyUI cannot concatenate their conds, so every training forward runs one
sample; a batch of the two predicts what each alone does. Every stack of blocks is a target (layers, noise_refiner,
context_refiner, ref_image_refiner); ref_image_refiner runs only on reference images, which text-to-image training
has none of, so its LoRA stays zero (and its layers out of the checkpointing gradient comparison) while the other
three train.
A second OmniGen2 run trains with a control folder (one reference image per item, ComfyUI's reference_latents): its
ref_image_refiner trains, ComfyUI's patched model fed the same reference through its own extra_conds (VAEEncode ->
ReferenceLatent) gives the trained model's output (< 1e-3), and another reference image moves the prediction.

Wan 2.2 TI2V 5B (comfy_small_wan22_5b.py) trains on clips (16x / 4x VAE, 2x2 patches: 32 px cells) with one timestep
per sample, then a second run with start images (do_i2v, through ComfyUI's Wan22ImageToVideoLatent): the start frame
clean at timestep 0 and out of the loss, ComfyUI's patched model fed by the node itself gives the trained model's
output, and another start image moves the prediction.

Flux.2 (built small, comfy_small_flux2.py) trains on 128-channel latents at 16x through ComfyUI's Flux.2 VAE, at the
shift of ComfyUI's Flux2Scheduler (its previews at that node's sigmas), and a second run with a control folder (as
OmniGen2's) gives every training step its item's reference as ComfyUI's ref_latents; ComfyUI's own ReferenceLatent
path through the patched model gives the trained model's output, and another reference moves the prediction.

Each family's targets are the stacks the README's table lists for it. A family built small asserts its latent and
preview shapes and that its conditions beside the caption reach the model (EXPECT's condition_effects: LTX-Video's
attention mask and frame rate, HunyuanVideo's pooled CLIP-L vector and guidance); LTX-Video trains with the shift
ComfyUI's ModelSamplingLTXV gives its latent, HunyuanVideo with ComfyUI's sampling shift (7) at guidance 1, its token
refiner (txt_in) no target; HunyuanVideo 1.5 trains on captions with quoted text (ComfyUI's byT5 conditioning reaches
the model) and its last double block's text-only layers, whose output the model discards, stay zero (exactly
EXPECT["untrained"]). Measured on the 2-core machine: LTX-Video ~15 s, HunyuanVideo ~1.5 min (ComfyUI's full-size
VAE), HunyuanVideo 1.5 ~35 s.

HiDream (comfy_small_hidream.py: ComfyUI's model with its MoE and its four text encoders, small): the Llama layers
(`conditioning_llama3`) and the pooled CLIP vector each move the prediction when taken from another caption, and the
targets hold the MoE's shared expert but none of its routed experts.

Qwen-Image (comfy_small_qwen_image.py): the layers of its last block's text stream, which the model computes and
discards, get no gradient and stay zero (exactly those, EXPECT["untrained"]); it trains at the shift ComfyUI samples
it with (mu 1.15 at every resolution, the sigmas equal to its model_sampling's), not Flux.1's resolution formula.
Qwen-Image-Edit (comfy_small_qwen_image_edit.py) trains with a control folder: each item's reference image goes in as
reference_latents and, with its caption, through the VL text encoder (cached per item); ComfyUI's own nodes
(TextEncodeQwenImageEditPlus, VAEEncode, ReferenceLatent) and its sampler's cond conversion give the trained model's
output; another reference, and each of the two ways in alone, move it.

Wan 2.1 I2V (comfy_small_wan21_i2v.py, with a small CLIP vision H), Wan 2.2 I2V A14B (WAN21_T2V with 36 input
channels, no CLIP vision) and Wan 2.1 VACE (comfy_small_wan21_vace.py) train with the inputs ComfyUI's own
WanImageToVideo / WanVaceToVideo build: every training forward gets them, ComfyUI's patched model fed by the node and
its sampler's conversion gives the trained model's output, another start image / control video moves it, and a job
without them is refused, naming them; VACE's reference image is a clean latent frame before the clip's, trimmed after.

fp8 base weights (comfy_small_flux_fp8.py: the Flux fixture through UNETLoader's weight_dtype fp8_e4m3fn;
comfy_small_flux_fp8_scaled.py: the same weights as a scaled-fp8 checkpoint, ComfyUI's mixed-precision ops): the
weights stay fp8 on the modules through training, no upcast copy is kept for backward, the LoRA gradient is the one on
the same weights upcast and close to the one on the file's bf16 weights, and ComfyUI's LoRA patch at cast time gives
the trained model's output (its merge into the fp8 weights is unbiased, rounding noise: _assert_fp8).

Each family runs in its own ComfyUI python process (comfy_check_train.py) on random checkpoints that ComfyUI
detects as that family (comfy_fixtures.py; the asserts check what ComfyUI detected). The fixtures are cached
in ERI_FIXTURE_CACHE (default ~/.cache/eridiffusion/comfy-fixtures; Wan's full-size UMT5-XXL text encoder is
5.7 GB in fp8). Needs COMFYUI_PATH (see comfy_env.py); skipped without it.
Measured on the 2-core dev machine with the fixtures cached: Flux ~0.8 min, SDXL ~1 min, OmniGen2 ~10 s, Wan ~4 min (the
UMT5-XXL encoder runs 512 tokens per caption on the CPU); writing the Wan fixtures adds ~2 min once.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.comfy_env import comfy_install, fixture_cache

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOL = 1e-3
DETECTED = {"flux": "Flux", "sdxl": "SDXL", "wan": "WAN21_T2V", "omnigen2": "Omnigen2"}


# the families built small from ComfyUI's own model classes (comfy_small_<name>.py)
SMALL = sorted(p.stem[len("comfy_small_"):] for p in HERE.glob("comfy_small_*.py"))


def readme_targets() -> dict[str, list[str]]:
    """The README's table of families proven on ComfyUI's MODEL: test name -> the stacks it lists as targets."""
    rows = {}
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1].startswith("`") and cells[0] and "(test `" in cells[0]:
            name = cells[0].split("(test `")[1].split("`")[0]
            rows[name] = sorted(c.strip("` ") for c in cells[2].split(","))
    return rows


def _assert_node_conditions(r: dict, want: dict) -> None:
    """A family whose inputs beside the latent ComfyUI's node builds (Wan I2V: WanImageToVideo; VACE: WanVaceToVideo):
    the cache holds what the node wrote, every training forward got it, ComfyUI's patched model fed by ComfyUI's own
    path (the node, its sampler's conversion) equals the trained one, another start image / control video moves the
    prediction far more than that error, and a job without the conditioning is refused, naming it."""
    n = r["node"]
    print(f"{want['name']}: cached {n['cond_keys']}; ComfyUI's inputs {n['comfy_cond_keys']}; patched vs trained rel"
          f" err {n['rel_err']:.1e}, LoRA effect {n['lora_effect']:.1e}, condition effect {n['condition_effect']:.1e},"
          f" CLIP vision effect {n['clip_vision_effect']}, without conditions {n['no_condition_effect']:.1e}")
    assert n["node"] == want["name"] and n["finite"], n
    assert n["cond_keys"] == want["cond_keys"], n
    assert n["comfy_cond_keys"] == want["comfy_cond_keys"], n
    beside = [k for k in want["comfy_cond_keys"] if k not in ("c_concat", "c_crossattn")]  # the model's own kwargs
    for seen in r["train_inputs"]:  # every training forward: the start image's channels filled, clip_fea / vace given
        assert set(beside) <= set(seen["kwargs"]), seen
        assert "c_concat" not in want["comfy_cond_keys"] or seen["beside_latent_max"] > 0, seen
    assert n["rel_err"] < TOL, n
    assert n["lora_effect"] > 1e-3 and n["lora_effect"] > 100 * n["rel_err"], n
    assert n["condition_effect"] > 1e-3 and n["condition_effect"] > 100 * n["rel_err"], n
    if want["clip_vision"]:  # the CLIP features alone move it; without a CLIP vision model the MODEL is refused
        assert n["clip_vision_effect"] > 100 * n["rel_err"], n
        assert "CLIP vision" in n["clip_vision_refusal"], n
    else:
        assert n["clip_vision_effect"] is None and n["clip_vision_refusal"] is None, n
    assert n["refusal"] and want["needs"] in n["refusal"] and r["detected"] in n["refusal"], n["refusal"]
    assert n["sample_shape"] == [3, 5, 64, 64], n  # a conditioned preview clip (VACE: its reference frame trimmed)
    if "trim_latent" in want:  # VACE's reference image: one latent frame before the clip's, trimmed after sampling
        assert n["trim_latent"] == want["trim_latent"], n
        assert n["leading_frames"] and all(f[1] == want["trim_latent"] for f in n["leading_frames"]), n
        assert n["latent_shape"][2] == n["trimmed_shape"][2] + want["trim_latent"], n
        # trained on it as a clean frame before the clip's: every training forward had the clip's frames + 1
        assert all(seen["frames"] == n["latent_shape"][2] for seen in r["train_inputs"]), r["train_inputs"]


@pytest.mark.parametrize("family", ["flux", "sdxl", "wan", "omnigen2", *SMALL])
def test_lora_trained_on_comfy_model_loads_back_identical(family: str, tmp_path: Path) -> None:
    comfy, python = comfy_install(f"ComfyUI-MODEL training test ({family})")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cmd = [str(python), str(HERE / "comfy_check_train.py"), "--comfyui", str(comfy), "--repo", str(REPO),
           "--family", family, "--cache", str(fixture_cache()), "--work", str(tmp_path / "work"), "--report", str(report)]
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"comfy_check_train.py {family} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r = json.loads(report.read_text())
    print(f"{family}: ComfyUI detected {r['detected']}; {r['n_targets']} layers trained, {r['n_patched']} patched; "
          f"losses {r['losses']}; patched vs trained rel err {r['rel_err']:.1e}, LoRA effect {r['lora_effect']:.1e}")
    expect = r["expect"]
    assert r["detected"] == (expect["detected"] if expect else DETECTED[family]), r
    # the targets are the README's for this family: every stack it names, and only those
    assert sorted(r["stacks"]) == readme_targets()[family], (r["stacks"], readme_targets().get(family))
    assert not r["not_loaded"], "ComfyUI did not load:\n" + "\n".join(r["not_loaded"][:20])
    assert r["n_targets"] > 0 and r["n_patched"] == r["n_targets"], r
    assert r["n_lora_tensors"] == 3 * r["n_targets"], r  # down, up, alpha per layer
    assert r["finite"] and all(loss == loss for loss in r["losses"]), r
    # the LoRA moved the output far more than the patched/trained disagreement: the comparison can fail
    assert r["lora_effect"] > 1e-3 and r["lora_effect"] > 100 * r["rel_err"], r
    assert r["rel_err"] < TOL, r
    # the conditioning reached the model: another caption moves the trained model's output
    print(f"{family}: caption effect {r['caption_effect']:.1e}; text {r['text_keys']}, lengths {r['text_lengths']}")
    assert r["caption_effect"] > 1e-3 and r["caption_effect"] > 100 * r["rel_err"], r
    assert r["pair_rel_err"] < TOL, r
    # gradient checkpointing on ComfyUI's own blocks: recomputed (a layer runs twice), same gradients
    print(f"{family}: checkpointing {r['ckpt_blocks']} blocks, gradient rel err {r['ckpt_grad_rel_err']:.1e}")
    assert r["ckpt_blocks"] > 0 and r["block_calls_plain_ckpt"] == [1, 2], r
    assert r["n_targets_ran"] == (r["n_targets"] - r["stacks"].get("ref_image_refiner", {}).get("targets", 0)), r
    assert r["ckpt_grads_complete"] and r["grad_norm"] > 0, r
    assert r["ckpt_grad_rel_err"] < TOL, r
    if expect:  # a family built small from ComfyUI's own classes: its model and conditioning entries
        assert r["model_class"] == expect["model_class"], r
        assert r["text_keys"] == expect["text_keys"], r
        # every stack ran and trained, but for the layers whose output the model discards (HunyuanVideo 1.5's last
        # double block's text stream, Qwen-Image's last block's): those, and only those, stay zero
        dead = expect.get("untrained", [])
        assert r["untrained"] == sorted(dead), r["untrained"]
        for name, s in r["stacks"].items():
            n_dead = sum(k.split(".")[1] == name for k in dead)
            assert s["targets"] > 0 and s["ran"] == s["targets"] and s["trained"] == s["targets"] - n_dead, (name, s)
        for key in ("latent_shapes", "sample_shape"):  # a video family: its clips' latents, its previews' frames
            if key in expect:
                assert r[key] == expect[key], (key, r[key])
        for stack in expect.get("not_targets", []):  # left out of the targets (HunyuanVideo's token refiner)
            assert stack not in r["stacks"], (stack, r["stacks"])
        # the family's conditions beside the caption (attention mask, frame rate ...) reach the model
        assert sorted(r["condition_effects"]) == sorted(expect.get("condition_effects", [])), r["condition_effects"]
        for name, effect in r["condition_effects"].items():
            print(f"{family}: {name} {effect:.1e}")
            assert effect > 1e-3 and effect > 100 * r["rel_err"], (name, effect, r["rel_err"])
        if "expert" in expect:  # a Wan 2.2 A14B expert: only its share of the schedule trained, the run named after it
            cut = expect["expert_boundary"] * r["timestep_scale"]  # ComfyUI's timesteps: sigma x its multiplier
            seen = r["train_timesteps"]
            print(f"{family}: training timesteps {[round(t, 1) for t in seen]} (boundary {cut:g})")
            assert len(seen) == 3 and r["run_name"].endswith("_" + expect["expert"]), r["run_name"]
            assert all(t >= cut for t in seen) if expect["expert"] == "high_noise" else all(t < cut for t in seen), seen
        if "node" in expect:  # trained with the inputs ComfyUI's own conditioning node builds (WanImageToVideo ...)
            _assert_node_conditions(r, expect["node"])
        if "train_forward_batches" in expect:  # the batch size of every training forward
            assert r["train_forward_batches"] == expect["train_forward_batches"], r["train_forward_batches"]
            assert len(set(r["text_lengths"])) == len(r["text_lengths"]), r["text_lengths"]  # captions' own lengths
        if "model_cond_keys" in expect:  # what ComfyUI's extra_conds made of the conditioning
            assert r["model_cond_keys"] == expect["model_cond_keys"], r["model_cond_keys"]
        if expect.get("pooled"):  # the pooled vector alone moves the output: it reached the model
            print(f"{family}: pooled effect {r['pooled_effect']:.1e}; model inputs {r['model_cond_keys']}")
            assert r["pooled_effect"] > 1e-3 and r["pooled_effect"] > 100 * r["rel_err"], r
        for key in ("train_shift_mu", "train_shift"):  # the training shift ComfyUI's config gives the family
            if key in expect:
                assert r[key] == (None if expect[key] is None else pytest.approx(expect[key], rel=1e-6)), (key, r[key])
    if (expect or {}).get("fp8"):  # ComfyUI holds the weights in fp8 (UNETLoader weight_dtype fp8_e4m3fn)
        _assert_fp8(r, expect["fp8"])
    if (expect or {}).get("reference"):  # trained on reference images (control_path): ComfyUI's reference_latents
        ref = r["reference"]
        print(f"{family} with references: patched vs trained rel err {ref['rel_err']:.1e} through ComfyUI's nodes,"
              f" LoRA effect {ref['lora_effect']:.1e}, reference effect {ref['reference_effect']:.1e} (reference"
              f" latent alone {ref['ref_latent_effect']:.1e}, image in the text {ref['text_image_effect']})")
        assert ref["finite"] and "ref_latents" in ref["comfy_cond_keys"], ref
        assert r["sample_shape"] in ([3, 64, 64], [3, 1, 64, 64]), r["sample_shape"]  # a preview with a reference
        # every training forward got the item's reference latent
        assert len(ref["train_ref_latents"]) == 3 and all(len(f) == 1 for f in ref["train_ref_latents"]), ref
        assert ref["lora_effect"] > 1e-3 and ref["lora_effect"] > 100 * ref["rel_err"], ref
        assert ref["rel_err"] < TOL, ref  # ComfyUI's own node path gives the trained model's output
        for effect in ("reference_effect", "ref_latent_effect", "no_reference_effect"):
            assert ref[effect] > 1e-3 and ref[effect] > 100 * ref["rel_err"], (effect, ref)
        assert ref["images_in_text"] == bool(expect.get("images_in_text")), ref
        if ref["images_in_text"]:  # the image through the VL text encoder alone moves the prediction
            assert ref["text_image_effect"] > 1e-3 and ref["text_image_effect"] > 100 * ref["rel_err"], ref
            # each item's caption cached with its control image (its image tokens make it longer than the caption
            # alone), and every training step read those
            plain, with_image = ref["text_lengths_plain"], ref["text_lengths_with_image"]
            assert len(with_image) == 2 and min(with_image) > max(plain), ref
            assert len(ref["train_context_lengths"]) == 3, ref
            assert set(ref["train_context_lengths"]) <= set(with_image), ref
            node = ref["text_image_node"]  # model.text_image_node: TextEncodeQwenImageEdit's encoding, not Plus's
            assert node["err"] < 1e-6 and node["differs_from_plus"] and node["lengths"][0] == node["lengths"][1], node
    if (expect or {}).get("shift_mu") is not None:  # the training shift is the one ComfyUI samples the family with
        shift = r["shift"]
        print(f"{family}: training shift mu {shift['mu_64px']} (64 px), {shift['mu_1024px']} (1024 px); ComfyUI's"
              f" {shift['comfy_shift']}; sigma max err {shift['sigma_max_err']:.1e}")
        assert shift["mu_64px"] == shift["mu_1024px"] == pytest.approx(expect["shift_mu"]), shift
        assert shift["comfy_shift"] == pytest.approx(expect["shift_mu"]) and shift["sigma_max_err"] < 1e-6, shift
    if family == "wan":  # real clips, not one-frame images: 5 frames -> 2 latent frames; video previews
        assert r["latent_shapes"] == [[16, 2, 8, 8]], r["latent_shapes"]
        assert r["sample_shape"] == [3, 5, 64, 64], r["sample_shape"]
    if family == "wan22_5b":  # the 16x / 4x VAE and 2x2 patches: 32 px cells; real clips; start images
        print(f"wan22_5b: factors {r['vae_factors']}, latents {r['latent_shapes']}, preview {r['sample_shape']}")
        assert r["vae_factors"] == {"vae_scale": 16, "vae_temporal": 4, "patch": 2, "pixel_factor": 32}, r
        assert r["latent_96x80x5"] == [1, 48, 2, 4, 6], r  # buckets of 32 px: 96x80 -> 96x64
        assert r["latent_shapes"] == [[48, 2, 4, 4]], r["latent_shapes"]  # 5 frames of 64 px -> 2 latent frames
        assert r["sample_shape"] == [3, 5, 64, 64], r["sample_shape"]  # a preview clip: 5 frames
        # text-to-video: one timestep per sample (ComfyUI's WAN22 without a denoise_mask)
        assert r["train_timestep_shapes"] == [[1]] * 3, r["train_timestep_shapes"]
        s = r["start_image"]
        print(f"wan22_5b with start images: losses {s['losses']}; timesteps {s['train_timesteps']}; patched vs"
              f" trained rel err {s['rel_err']:.1e}, LoRA effect {s['lora_effect']:.1e}, start image effect"
              f" {s['start_effect']:.1e}")
        assert s["finite"] and all(loss == loss for loss in s["losses"]), s
        assert s["cond_keys"] == ["start_given", "start_latent"], s
        assert s["given_frames"] == [[1.0, 0.0]], s  # the first latent frame is the start image's
        # per-frame timesteps: 0 on the start frame, the step's timestep on the frame it generates
        assert len(s["train_timesteps"]) == 3 and all(len(t) == 2 and t[0] == 0 < t[1] for t in s["train_timesteps"]), s
        assert s["frame_timesteps"][0] == 0 < s["frame_timesteps"][1], s
        assert s["frame_timesteps"] == pytest.approx(s["comfy_frame_timesteps"], rel=1e-6), s
        assert "denoise_mask" in s["comfy_cond_keys"], s  # ComfyUI's own path: the node's noise_mask as the sampler's
        assert s["lora_effect"] > 1e-3 and s["lora_effect"] > 100 * s["rel_err"], s
        assert s["rel_err"] < TOL, s
        assert s["start_effect"] > 1e-3 and s["start_effect"] > 100 * s["rel_err"], s  # another start image
        assert s["sample_shape"] == [3, 5, 64, 64], s
    if family in ("hunyuan_video", "hunyuan_video15"):  # ComfyUI's sampling shift (7); 1.0 is guidance-distilled,
        # trained at guidance 1 (1.5 has no guidance embedding)
        print(f"{family}: shift {r['train_shift']}, guidance {r['train_guidance']}, text tokens kept of the"
              f" templated prompt's {r['template_crop']}")
        assert r["train_shift"] == [7.0, 7.0] and r["train_guidance"] == [family == "hunyuan_video", 1.0], r
        assert r["template_crop"][1] < r["template_crop"][0] - 90, r["template_crop"]  # the template's 94 tokens go
    if family == "ltxv":  # trained with the shift ComfyUI's ModelSamplingLTXV gives the latent, not the config's 2.37
        print(f"ltxv: training mu {r['shift_mu']} (config shift {r['default_shift']})")
        assert abs(r["shift_mu"][0] - r["shift_mu"][1]) < 1e-9 and r["shift_mu"][0] != r["default_shift"], r
        assert r["sample_sigmas_err"] < 1e-6, r
    if family == "sd35":  # ComfyUI's ModelSamplingSD3 node on the MODEL: training and previews at its shift
        n = r["node_shift"]
        print(f"sd35: ModelSamplingSD3(6) -> training shift {n['train_shift']} (without the node {n['unpatched']});"
              f" preview sigmas err {n['sigmas_err']:.1e}")
        assert n["train_shift"] == 6.0 and n["unpatched"] == 3.0 and n["sigmas_err"] < 1e-6, n
    if family == "hidream":  # the Llama layers and the pooled vector reach the model each; shared expert in, routed out
        h = r["hidream"]
        print(f"hidream: condition effects {h['condition_effects']}; shared-expert targets {h['shared_expert_targets']},"
              f" routed {h['routed_expert_targets']} (of {h['routed_expert_linears_in_model']} routed-expert linears)")
        for key, effect in h["condition_effects"].items():
            assert effect > 1e-3 and effect > 100 * r["rel_err"], (key, h)
        assert h["llama_shapes"] == [expect["llama_shape"]], h
        assert h["shared_expert_targets"] > 0 and h["routed_expert_targets"] == 0, h
        assert h["routed_expert_linears_in_model"] > 0, h  # the MoE is there, only left out of the targets
    if family == "flux2":  # ComfyUI's Flux.2 VAE: 128 channels (32 packed 2x2) at 16x; its Flux2Scheduler's shift
        print(f"flux2: latents {r['latent_shapes']}; training mu at 1024x1024 {r['train_shift_mu_1024']:.4f}; "
              f"preview sigmas {r['preview_sigmas']}")
        assert r["latent_shapes"] == [[128, 4, 4]], r["latent_shapes"]  # 64 px images
        assert abs(r["train_shift_mu_1024"] - 2.0234) < 1e-4, r  # the scheduler's mu at 50 steps; its config: 2.02
        assert r["preview_sigmas_err"] < 1e-6 and len(r["preview_sigmas"]) == 5, r  # = Flux2Scheduler(4, 64, 64)
    if family == "omnigen2":
        print(f"omnigen2: stacks {r['stacks']}; training forwards {r['train_forward_batches']}")
        assert r["text_keys"] == ["attention_mask", "attention_mask__shape", "cross_attn", "cross_attn__shape"], r
        lengths = r["text_lengths"]
        assert len(lengths) == 2 and lengths[0] != lengths[1], lengths  # two captions, two token lengths
        for name, s in r["stacks"].items():
            assert s["targets"] > 0, (name, s)
            # what ran trained; ref_image_refiner never runs without reference images (its LoRA stays zero)
            want = 0 if name == "ref_image_refiner" else s["targets"]
            assert s["ran"] == want and s["trained"] == want, (name, s)
        # batch 2, samples one at a time (ComfyUI cannot concatenate conds of different lengths): 3 steps x 2
        assert r["train_forward_batches"] == [1] * 6, r["train_forward_batches"]
        assert r["sample_shape"] == [3, 64, 64], r["sample_shape"]  # a CFG preview through ComfyUI's VAE, finite
        # trained with a control folder: the reference images go in as ComfyUI's reference_latents
        ref = r["reference"]
        print(f"omnigen2 with references: losses {ref['losses']}; ref_image_refiner {ref['ref_trained']}/"
              f"{ref['ref_targets']} trained; patched vs trained rel err {ref['rel_err']:.1e}, LoRA effect"
              f" {ref['lora_effect']:.1e}, reference effect {ref['reference_effect']:.1e}")
        assert_reference_run(ref)
        assert ref["ref_targets"] > 0 and ref["ref_trained"] == ref["ref_targets"], ref  # now they train
    if expect and expect.get("references"):  # a family built small, trained with a control folder too
        ref = r["reference"]
        print(f"{family} with references: losses {ref['losses']}; references per training forward "
              f"{ref['train_refs_per_forward']}; patched vs trained rel err {ref['rel_err']:.1e}, LoRA effect "
              f"{ref['lora_effect']:.1e}, reference effect {ref['reference_effect']:.1e}")
        assert_reference_run(ref)
        assert ref["train_refs_per_forward"] == [1] * 3, ref  # every training step saw its item's reference


def assert_reference_run(ref: dict) -> None:
    """A run with a control folder: each item's reference cached as its condition and given to the model as
    ComfyUI's ref_latents; ComfyUI's own ReferenceLatent path through the patched model gives the trained model's
    output, and the reference moves the prediction by far more than that error."""
    assert ref["finite"] and all(loss == loss for loss in ref["losses"]), ref
    assert ref["cond_keys"] == ["control"], ref  # the cached condition of each item
    assert "ref_latents" in ref["comfy_cond_keys"], ref
    assert ref["lora_effect"] > 1e-3 and ref["lora_effect"] > 100 * ref["rel_err"], ref
    assert ref["rel_err"] < TOL, ref  # ComfyUI's own reference_latents path gives the trained model's output
    assert ref["reference_effect"] > 1e-3 and ref["reference_effect"] > 100 * ref["rel_err"], ref
    assert ref["no_reference_effect"] > 1e-3, ref  # the reference reaches the model at all


def _assert_fp8(r: dict, want: dict) -> None:
    """Training on a MODEL whose weights ComfyUI holds in fp8. The weights stayed fp8 on the modules through training
    (the same storages, fp8 at every training forward) and autograd kept none of the copies ComfyUI's cast ops make
    (the backend keeps the layer and casts again in backward, with the same gradients; keeping the copies, as without
    it, holds over half the model's weights upcast in one pass). The LoRA gradient on the fp8 weights is the one on
    the same weights upcast (bit for bit on the CPU: the cast path computes what the upcast model does) and close in
    direction to the one on the file's bf16 weights (e4m3's 3 mantissa bits, up to 6% per weight, and plain fp8's
    small weights subnormal: 0.996 measured; scaled 0.9992).
    ComfyUI's patched model: applied at cast time (LowVramPatch, how ComfyUI runs a partially loaded model) it gives
    the trained model's output to float32 rounding (the usual rel_err < 1e-3, asserted above); merged into the fp8
    weights at a full load (always so on the CPU) the sum is rounded back to fp8 stochastically (a scaled-fp8 layer
    requantized): unbiased (the merge's change over the exact LoRA change has slope ~1) but noisy, 2.6e-2 (fp8) /
    1.5e-2 (scaled) of the output for this LoRA, 19x / 33x less than its effect, asserted only to stay nearer the
    trained output than the base model is. The scaled-fp8 file's other layers are not fp8 (ComfyUI's unet dtype)."""
    f = r["fp8"]
    print(f"fp8: {f['n_fp8_params']} parameters stored {f['stored_dtypes']} ({f['fp8_bytes'] / 2**20:.0f} MiB), ops"
          f" {f['ops']} computing in {f['manual_cast_dtype']}; upcast weights kept for backward: training"
          f" {f['train_saved_upcast_peak']} B ({f['train_recasts']} recast), a plain pass {f['saved_upcast_peak']} B"
          f" ({f['recasts']} recast), keeping the copies {f['saved_upcast_peak_copies'] / 2**20:.0f} MiB of"
          f" {f['upcast_weight_bytes'] / 2**20:.0f} MiB; grad cosine vs upcast {f['grad_cos_upcast']:.12f} (rel err"
          f" {f['grad_rel_err_upcast']:.1e}), vs the {f['file_dtypes']} file {f['grad_cos_file']:.4f}; cast-time patch"
          f" rel err {r['rel_err']:.1e} ({f['n_cast_time_patches']} LowVramPatch), merged rel err"
          f" {f['merged_rel_err']:.1e} (LoRA effect {f['merged_lora_effect']:.1e}, slope {f['merge_slope']:.4f},"
          f" {f['merge_changed_fraction']:.1%} of the weights changed)")
    assert f["stored_dtypes"] == [want["weight_dtype"]] and f["n_fp8_params"] > 0, f
    assert f["train_forward_weight_dtypes"] == [want["weight_dtype"]] and f["n_train_forwards"] == 3, f
    assert f["storage_unchanged"], f  # nothing upcast in place, no parameter replaced by a copy
    assert f["backend_fp8_layers"] > 0 and f["ops"] == want.get("ops", "manual_cast.Linear"), f
    assert f["manual_cast_dtype"] == "torch.float32", f  # ComfyUI's compute dtype on the CPU
    assert f["train_saved_upcast_peak"] == 0 and f["train_recasts"] > 0, f
    assert f["saved_upcast_peak"] == 0 and f["recasts"] > 0 and f["recast_grad_rel_err"] == 0, f
    assert f["saved_upcast_peak_copies"] > 0.5 * f["upcast_weight_bytes"] and f["recasts_copies"] == 0, f
    assert f["repeat_grad_rel_err"] == 0, f
    assert f["grad_cos_upcast"] > 1 - 1e-9 and f["grad_rel_err_upcast"] < 1e-6, f
    assert f["grad_cos_file"] > 0.99 and f["grad_rel_err_file"] > 0, f  # fp8 rounding is there, and small
    assert f["n_cast_time_patches"] == r["n_patched"], f  # every trained weight patched at cast time
    assert f["merged_weights"] == r["n_patched"] and 0.9 < f["merge_slope"] < 1.1, f
    assert f["merged_finite"] and f["merged_rel_err"] < f["merged_lora_effect"], f
