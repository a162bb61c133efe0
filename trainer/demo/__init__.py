"""`python -m trainer demo`: a whole run on a fresh machine, offline, on CPU.

It writes a small random model of the family (in the layout ComfyUI loads), a synthetic captioned
dataset and the job YAML into a work folder, trains a LoRA, and says where everything is.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..models import registry
from .chroma import write_chroma_demo
from .flux import write_flex2_demo, write_flux_demo
from .kolors import write_kolors_demo
from .ltxv import write_ltxv_demo
from .hunyuan_video import write_hunyuan_video_demo
from .hidream import write_hidream_demo
from .omnigen2 import write_omnigen2_demo
from .sana import write_sana_demo
from .sd3 import write_sd3_demo
from .sdxl import write_sdxl_demo
from .videos import COLORS, SHAPES, draw_shape, make_video_dataset
from .wan import write_wan_demo

# arch -> writer of its demo files (returns the `model:` config); and the arches whose demo adds control images
DEMO_WRITERS = {
    "flux": write_flux_demo,
    "flex1": lambda folder: write_flux_demo(folder, arch="flex1"),
    "flex2": write_flex2_demo,
    "chroma": write_chroma_demo,
    "sd3": write_sd3_demo,
    "sdxl": write_sdxl_demo,
    "kolors": write_kolors_demo,
    "wan21": write_wan_demo,
    "wan21_i2v": lambda folder: write_wan_demo(folder, i2v=True),
    "wan21_vace": lambda folder: write_wan_demo(folder, vace=True),
    "ltxv": write_ltxv_demo,
    "hunyuan_video": write_hunyuan_video_demo,
    "hidream": write_hidream_demo,
    "sana": write_sana_demo,
    "omnigen2": write_omnigen2_demo,
}



def make_dataset(folder: Path, n: int = 8, size: tuple[int, int] = (128, 128), seed: int = 0,
                 controls: Path | None = None) -> Path:
    """Synthetic images of colored shapes with captions that describe them; with `controls`, a control image
    per image there (the shape's white silhouette on black, like a segmentation map), of the same name."""
    folder.mkdir(parents=True, exist_ok=True)
    if controls is not None:
        controls.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(n):
        fg, bg = rng.sample(names, 2)
        shape = SHAPES[i % len(SHAPES)]
        w, h = size
        img = Image.new("RGB", (w, h), COLORS[bg])
        silhouette = Image.new("RGB", (w, h), COLORS["black"])
        r = rng.randint(min(w, h) // 5, min(w, h) // 3)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        for im, color in ((img, COLORS[fg]), (silhouette, COLORS["white"])):
            draw_shape(ImageDraw.Draw(im), shape, cx, cy, r, color)
        img.save(folder / f"shape_{i:02d}.png")
        if controls is not None:
            silhouette.save(controls / f"shape_{i:02d}.png")
        (folder / f"shape_{i:02d}.txt").write_text(f"a {fg} {shape} on a {bg} background")
    return folder


def demo_job(name: str, model: dict, dataset: Path, out: Path, steps: int, controls: Path | None = None,
             video: bool = False, start_image: Path | None = None) -> dict:
    data = {"folder_path": str(dataset), "caption_ext": "txt", "resolution": [64 if video else 128],
            "cache_latents_to_disk": True}
    prompts = ["[trigger], a red circle on a blue background", "[trigger], a yellow square on a black background"]
    sample: dict = {"prompts": prompts}
    size = {"width": 64, "height": 48, "num_frames": 9} if video else {"width": 128, "height": 128}
    if video:
        data["num_frames"] = 9
    if start_image is not None:  # image-to-video: the clips' first frames condition, and one preview's start image
        data["do_i2v"] = True
        sample = {"samples": [{"prompt": p, "control_image": str(start_image)} for p in prompts]}
    elif controls is not None:
        data.update(control_path=str(controls), control_dropout=0.2)
        # the second preview follows a control image of the dataset
        sample = {"samples": [{"prompt": prompts[0]},
                              {"prompt": prompts[1], "control_image": str(controls / "shape_01.png")}]}
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [{
                "type": "sd_trainer",
                "training_folder": str(out / "output"),
                "device": "cpu",
                "trigger_word": "sks",
                "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
                "save": {"dtype": "bf16", "save_every": max(1, steps // 2), "max_step_saves_to_keep": 2},
                "datasets": [data],
                "train": {"batch_size": 1, "steps": steps, "lr": 1e-3, "optimizer": "adamw", "dtype": "fp32",
                          "gradient_checkpointing": False, "timestep_type": "sigmoid",
                          "cache_text_embeddings": True, "seed": 42},
                "model": model,
                "sample": {"sample_every": max(1, steps // 2), **size, "sample_steps": 4,
                           "guidance_scale": 3.5, "seed": 42, "walk_seed": True, **sample},
            }],
        },
        "meta": {"name": name, "version": "1.0"},
    }


CLIP_LOADERS = {1: "Load CLIP", 2: "DualCLIPLoader", 3: "TripleCLIPLoader", 4: "QuadrupleCLIPLoader"}


def comfyui_guide(model: dict, family, lora: Path) -> str:
    """Which file goes into which ComfyUI models folder, and the loader nodes that read them."""
    lines = ["In ComfyUI (random weights: the outputs are noise, the path is what is shown):"]
    encoders = model.get("text_encoder_paths") or []
    if encoders and not model.get("vae_path"):  # the VAE inside the checkpoint (LTX-Video), the encoders beside it
        lines.append(f"  models/checkpoints/       {Path(model['name_or_path']).name}   -> Load Checkpoint (the model and"
                     " its VAE; the text encoders below)")
    elif encoders:
        folder, node = family.comfy_model_loader or ("diffusion_models", "Load Diffusion Model")
        lines.append(f"  {'models/' + folder + '/':<24}  {Path(model['name_or_path']).name}   -> {node}")
    if encoders:
        folder, node = family.comfy_text_loader or ("text_encoders", None)
        loader = node or f"{CLIP_LOADERS.get(len(encoders), 'Load CLIP')} (type {family.comfy_clip_type})"
        for p in encoders:
            lines.append(f"  {'models/' + folder + '/':<24}  {Path(p).name}   -> {loader}")
        if model.get("vae_path"):
            folder, node = family.comfy_vae_loader or ("vae", "Load VAE")
            lines.append(f"  {'models/' + folder + '/':<24}  {Path(model['vae_path']).name}   -> {node}")
    else:
        lines.append(f"  models/checkpoints/       {Path(model['name_or_path']).name}   -> Load Checkpoint (model, CLIP"
                     " and VAE in one file)")
    if model.get("clip_vision_path"):
        lines.append(f"  models/clip_vision/       {Path(model['clip_vision_path']).name}   -> Load CLIP Vision")
    lines.append(f"  models/loras/             {lora.name}   -> LoraLoaderModelOnly on the MODEL")
    return "\n".join(lines)


def run_demo(arch: str, out_dir: str, steps: int | None) -> int:
    from ..run import run_job_file
    from ..train.distributed import require_single_process

    require_single_process("the demo")  # every rank would write the same demo files at once
    name = registry.canonical_arch(arch)
    if name is None or name not in DEMO_WRITERS:
        raise ConfigError(f"--arch {arch}: no demo for this arch; demos: {', '.join(sorted(DEMO_WRITERS))}")
    arch = name
    family = registry.get_family(arch)
    out = Path(out_dir).resolve()
    t0 = time.perf_counter()
    print(f"writing a random {arch} model, text encoders and VAE into {out / 'models'}", flush=True)
    model = DEMO_WRITERS[arch](out / "models")
    start_image = None
    if family.video:
        dataset = make_video_dataset(out / "dataset", n=4, size=(64, 48), frames=24, fps=16)
        controls = None
        if family.takes_control:  # image-to-video: a start image for the previews
            from ..data.media import read_frames

            start_image = out / "start_image.png"
            read_frames(dataset / "clip_00.mp4", [0])[0].save(start_image)
    else:
        controls = out / "dataset_control" if family.takes_control else None
        dataset = make_dataset(out / "dataset", controls=controls)
    steps = steps or 20
    name = f"demo_{arch}_lora"
    job_path = out / f"{name}.yaml"
    write_text_atomic(job_path, yaml.safe_dump(demo_job(name, model, dataset, out, steps, controls, family.video, start_image),
                                             sort_keys=False))
    print(f"job: {job_path}", flush=True)
    rc = run_job_file(str(job_path), [])
    run = out / "output" / name
    print(
        f"\ndemo finished in {time.perf_counter() - t0:.0f}s\n"
        f"  LoRA:     {run / (name + '.safetensors')}\n"
        f"  samples:  {run / 'samples'}\n"
        f"  metrics:  {run / 'metrics.jsonl'}\n"
        f"  job:      {job_path}  (run it again with: python -m trainer {job_path})\n"
        + comfyui_guide(model, family, run / (name + ".safetensors")),
        flush=True,
    )
    return rc
