"""Writes example_workflows/*.json (what ComfyUI's frontend opens) and the YAML twin of each by-arch workflow,
from one description per workflow below. Widget order and input sockets come from the nodes' own schemas,
and the YAML twin is what the nodes themselves emit (the same calls EriExportJob makes), so the two cannot
drift apart. Needs ComfyUI's python (the nodes import comfy_api):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python scripts/build_example_workflows.py

tests/integration/test_comfyui_nodes.py checks every workflow against a live server's /object_info and
re-exports it to its twin.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "example_workflows"
WIDGET_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN", "COMBO"}
CORE = {  # ComfyUI's own nodes used here: (socket inputs, widgets, outputs)
    "UNETLoader": ([], ["unet_name", "weight_dtype"], [("MODEL", "MODEL")]),
    "CLIPLoader": ([], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "Note": ([], ["text"], []),
    "LoadImage": ([], ["image"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
}

DEMO = "custom_nodes/EriDiffusion/demo"


def _import_nodes():
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        sys.exit("set COMFYUI_PATH to a ComfyUI folder (the nodes import comfy_api)")
    sys.path.insert(0, comfy)
    from comfy.cli_args import args

    args.cpu = True
    pkg_root = tempfile.mkdtemp()
    os.symlink(REPO, os.path.join(pkg_root, "EriDiffusion"))
    sys.path.insert(0, pkg_root)
    from EriDiffusion.nodes import model, parts, train, yaml_bridge

    classes = {}
    for mod in (model, parts, train, yaml_bridge):
        for v in vars(mod).values():
            if isinstance(v, type) and hasattr(v, "define_schema") and v.__module__ == mod.__name__:
                classes[v.define_schema().node_id] = v
    return classes


def _layout(cls) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """(socket inputs, widget names in the frontend's order: required then optional, outputs) of a node."""
    schema = cls.define_schema()
    sockets, req, opt = [], [], []
    for i in schema.inputs:
        t = i.get_io_type()
        if t in WIDGET_TYPES:
            (opt if i.optional else req).append(i.id)
        else:
            sockets.append((i.id, t))
    outputs = [(o.display_name or o.get_io_type(), o.get_io_type()) for o in schema.outputs]
    return sockets, req + opt, outputs


def build(name: str, nodes: list[dict], edges: list[tuple[int, int, int, str]], classes: dict) -> dict:
    """nodes: {id, type, pos, widgets: {name: value}, size?}; edges: (src id, src slot, dst id, dst input)."""
    links = []
    by_id = {n["id"]: n for n in nodes}
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for lid, (src, slot, dst, inp) in enumerate(edges, start=1):
        typ = _layout_of(by_id[src]["type"], classes)[2][slot][1]
        links.append([lid, src, slot, dst, None, typ])
        out_links.setdefault((src, slot), []).append(lid)
        in_links[(dst, inp)] = lid
    ui_nodes = []
    for order, n in enumerate(nodes):
        sockets, widgets, outputs = _layout_of(n["type"], classes)
        unknown = set(n.get("widgets", {})) - set(widgets)
        if unknown:
            raise SystemExit(f"{name}: {n['type']} has no widgets {sorted(unknown)}")
        # optional widgets a description leaves out (added to a node later: Wan 2.2's expert) take the node's default
        values = {**_optional_defaults(n["type"], classes), **n.get("widgets", {})}
        n = {**n, "widgets": values}
        missing = [w for w in widgets if w not in values]
        if missing:
            raise SystemExit(f"{name}: {n['type']} needs values for {missing}")
        inputs = []
        for slot, (iname, typ) in enumerate(sockets):
            lid = in_links.get((n["id"], iname))
            inputs.append({"name": iname, "type": typ, "link": lid})
            if lid is not None:
                links[lid - 1][4] = slot
        ui = {
            "id": n["id"], "type": n["type"], "pos": list(n["pos"]), "size": list(n.get("size", [400, 300])),
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": oname, "type": typ, "links": out_links.get((n["id"], slot), []),
                         **({"slot_index": slot} if out_links.get((n["id"], slot)) else {})}
                        for slot, (oname, typ) in enumerate(outputs)],
            "properties": {} if n["type"] == "Note" else {"Node name for S&R": n["type"]},
            "widgets_values": [n["widgets"][w] for w in widgets],
        }
        if n["type"] == "Note":
            ui.update(color="#432", bgcolor="#653")
        ui_nodes.append(ui)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"eridiffusion/{name}")), "revision": 0,
        "last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
        "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


_LAYOUTS: dict[str, tuple] = {}


def _optional_defaults(node_type: str, classes: dict) -> dict:
    """The node's optional widgets with their schema defaults (none for ComfyUI's own nodes: CORE)."""
    if node_type in CORE:
        return {}
    return {i.id: i.default for i in classes[node_type].define_schema().inputs
            if i.optional and i.get_io_type() in WIDGET_TYPES and getattr(i, "default", None) is not None}


def _layout_of(node_type: str, classes: dict):
    if node_type not in _LAYOUTS:
        if node_type in CORE:
            s, w, o = CORE[node_type]
            _LAYOUTS[node_type] = (s, w, o)
        else:
            _LAYOUTS[node_type] = _layout(classes[node_type])
    return _LAYOUTS[node_type]


def _run(classes: dict, node_type: str, widgets: dict, **sockets):
    return classes[node_type].execute(**widgets, **sockets).args[0]


# --- the workflows ----------------------------------------------------------------------------------------
def settings(name: str, **over) -> dict:
    """Training Settings for a 24 GB card (bf16, checkpointing, cached text embeddings)."""
    s = dict(name=name, training_folder="", lr=1e-4, optimizer="adamw8bit", lr_scheduler="constant",
             lr_warmup_steps=0, batch_size=1, gradient_accumulation=1, timestep_type="sigmoid", dtype="bf16",
             gradient_checkpointing=True, cache_text_embeddings=True, seed=42, save_every=250,
             save_dtype="bf16", max_step_saves_to_keep=4, sample_every=250,
             sample_prompts="[trigger] in a forest\n[trigger], close-up portrait", sample_width=1024,
             sample_height=1024, sample_steps=20, guidance_scale=4.0, sample_num_frames=1, blocks_to_swap="0",
             offload_activations=False)
    s.update(over)
    return s


def dataset(**over) -> dict:
    d = dict(folder_path="input/my_lora_dataset", trigger_word="sks", caption_ext="txt", default_caption="",
             resolution="512, 768, 1024", caption_dropout_rate=0.05, num_repeats=1, flip_x=False,
             shuffle_tokens=False, keep_tokens=0, cache_latents_to_disk=True, control_path="", control_dropout=0.0,
             num_frames=1, frames="", shrink_video_to_frames=True, fps=0.0, clips_per_video=1, do_i2v=False,
             mask_path="", reference_path="", background_color="white")
    d.update(over)
    return d


def network(**over) -> dict:
    n = dict(type="lora", rank=16, alpha=16.0, conv_rank=0, conv_alpha=0.0, lokr_factor=-1, lokr_full_rank=False,
             only_if_contains="", ignore_if_contains="")
    n.update(over)
    return n


def by_arch_workflow(name: str, model: dict, steps: int, note: str, ds: dict | None = None,
                     net: dict | None = None, sets: dict | None = None, sample: dict | None = None,
                     start_image: str | None = None):
    ds, net, sets = ds or dataset(), net or network(), sets or settings(name)
    sample = {"frames": 1, **(sample or dict(prompt="sks in a forest", negative="", width=1024, height=1024, steps=20,
                                             guidance=4.0, seed=42))}
    nodes = [
        {"id": 1, "type": "EriModelByArch", "pos": [40, 60], "size": [400, 330], "widgets": model},
        {"id": 2, "type": "EriDataset", "pos": [40, 430], "size": [400, 460], "widgets": ds},
        {"id": 3, "type": "EriNetwork", "pos": [40, 930], "size": [400, 300], "widgets": net},
        {"id": 4, "type": "EriTrainSettings", "pos": [480, 60], "size": [400, 760], "widgets": sets},
        {"id": 5, "type": "EriTrain", "pos": [920, 60], "size": [340, 200], "widgets": {"steps": steps}},
        {"id": 6, "type": "EriSaveLoRA", "pos": [1300, 60], "size": [340, 160],
         "widgets": {"filename": name, "subfolder": "eridiffusion", "dtype": sets["save_dtype"]}},
        {"id": 7, "type": "EriSample", "pos": [1300, 280], "size": [340, 360], "widgets": sample},
        {"id": 8, "type": "SaveImage", "pos": [1680, 280], "size": [300, 330],
         "widgets": {"filename_prefix": f"eridiffusion/{name}_sample"}},
        {"id": 9, "type": "Note", "pos": [480, 860], "size": [400, 240], "widgets": {"text": note}},
    ]
    edges = [(1, 0, 5, "training_model"), (2, 0, 5, "datasets"), (3, 0, 5, "network"), (4, 0, 5, "settings"),
             (5, 0, 6, "state"), (5, 0, 7, "state"), (7, 0, 8, "images")]
    if start_image is not None:  # image-to-video previews start from an image
        nodes.append({"id": 10, "type": "LoadImage", "pos": [920, 320], "size": [340, 320],
                      "widgets": {"image": start_image}})
        edges.append((10, 0, 7, "control_image"))
    return nodes, edges


def twin_yaml(classes: dict, nodes: list[dict], steps: int, header: str, demo: bool) -> str:
    """What EriExportJob writes for this graph, with the paths as the workflow names them (relative to the ComfyUI
    folder); the demo's relative to the YAML's own folder, so it runs from anywhere."""
    from EriDiffusion.trainer.config import dump_job_yaml, load_job_dict
    from EriDiffusion.trainer.session import job_from_parts

    w = {n["type"]: n["widgets"] for n in nodes}
    model = _run(classes, "EriModelByArch", w["EriModelByArch"])
    ds = _run(classes, "EriDataset", w["EriDataset"])
    net = _run(classes, "EriNetwork", w["EriNetwork"])
    sets = _run(classes, "EriTrainSettings", w["EriTrainSettings"])
    job = job_from_parts(model, ds, net, sets, steps, "output/eridiffusion")
    text = dump_job_yaml(load_job_dict(job))
    if demo:  # the repository's demo/ beside example_workflows/, writing into demo/output
        text = text.replace("custom_nodes/EriDiffusion/", "../").replace("training_folder: output/eridiffusion",
                                                                           "training_folder: ../demo/output")
    return header + text


def main() -> int:
    classes = _import_nodes()
    specs = []

    # flux_demo_train: runs on the files `python -m trainer demo` writes (CPU is enough)
    flux_demo_model = dict(arch="flux", name_or_path=f"{DEMO}/models/flux_demo.safetensors",
                           text_encoder_paths=f"{DEMO}/models/clip_l_demo.safetensors\n{DEMO}/models/t5_demo.safetensors",
                           vae_path=f"{DEMO}/models/ae_demo.safetensors",
                           tokenizer_paths=f"{DEMO}/models/tokenizer_clip\n{DEMO}/models/tokenizer_t5", t5_max_length=32,
                           quantize=False, clip_vision_path="")
    specs.append(("flux_demo_train", flux_demo_model, 10, dict(
        ds=dataset(folder_path=f"{DEMO}/dataset", resolution="128"),
        net=network(rank=4, alpha=4.0),
        sets=settings("flux_demo_train", lr=1e-3, optimizer="adamw", dtype="fp32", gradient_checkpointing=False,
                      save_every=5, max_step_saves_to_keep=2, sample_every=250, sample_prompts="", sample_width=128,
                      sample_height=128, sample_steps=4, guidance_scale=3.5),
        sample=dict(prompt="sks, a red circle on a blue background", negative="", width=128, height=128, steps=4,
                    guidance=3.5, seed=42),
        note="EriDiffusion demo: a LoRA on the random Flux that `python -m trainer demo` writes.\n\n"
             "1. In the EriDiffusion folder (ComfyUI/custom_nodes/EriDiffusion) run `python -m trainer demo`.\n"
             "2. Paths here are relative to the folder ComfyUI was started from (its own folder): change them, or "
             "use absolute paths, if yours differs.\n3. Queue (10 steps: a few minutes on a CPU). The LoRA goes to "
             "models/loras/eridiffusion, checkpoints to output/eridiffusion.\n\nSame run from a shell: python -m "
             "trainer example_workflows/flux_demo_train.yaml\nfp32 suits CPUs; on a GPU pick bf16."), True))

    real_note = ("EriDiffusion: {what}\n\nPoint the model node at your files (paths relative to the ComfyUI folder, "
                 "or absolute) and the dataset node at a folder of images with .txt captions. {extra}\n"
                 "The LoRA goes to models/loras/eridiffusion; the run (saves, samples, metrics) to output/eridiffusion. "
                 "Queue again to resume from the last save.\n\nSame run from a shell, in the ComfyUI folder: "
                 "trainer custom_nodes/EriDiffusion/example_workflows/{name}.yaml")
    specs.append(("sdxl_train", dict(arch="sdxl", name_or_path="models/checkpoints/sd_xl_base_1.0.safetensors",
                                     text_encoder_paths="", vae_path="", tokenizer_paths="", t5_max_length=0, quantize=False, clip_vision_path=""), 2000, dict(
        sets=settings("sdxl_train", lr=1e-4, guidance_scale=6.0, sample_steps=25),
        net=network(type="locon", rank=16, alpha=8.0, conv_rank=8, conv_alpha=4.0),
        sample=dict(prompt="sks in a forest", negative="blurry, low quality", width=1024, height=1024, steps=25,
                    guidance=6.0, seed=42),
        note=real_note.format(what="a LoCon (linear + conv) for SDXL from one checkpoint file.", name="sdxl_train",
                              extra="The checkpoint holds the UNet, both CLIPs and the VAE; v-prediction models are "
                                    "recognized by their marker (or set is_v_pred in YAML).")), False))
    specs.append(("flux_dev_train", dict(arch="flux", name_or_path="models/diffusion_models/flux1-dev.safetensors",
                                         text_encoder_paths="models/text_encoders/clip_l.safetensors\n"
                                                            "models/text_encoders/t5xxl_fp16.safetensors",
                                         vae_path="models/vae/ae.safetensors", tokenizer_paths="", t5_max_length=0,
                                         quantize=True, clip_vision_path=""),
                  2000, dict(
        sets=settings("flux_dev_train", lr=1e-4, timestep_type="flux_shift", guidance_scale=3.5),
        sample=dict(prompt="sks in a forest", negative="", width=1024, height=1024, steps=20, guidance=3.5, seed=42),
        note=real_note.format(what="a LoRA for FLUX.1-dev.", name="flux_dev_train",
                              extra="quantize stores Flux's weights in fp8: 14.8 GiB at 1024 px (measured on an H100); "
                                    "turn it off on a card with 32 GB or more for bf16 weights.")), False))
    specs.append(("chroma_train", dict(arch="chroma", name_or_path="models/diffusion_models/chroma-unlocked-v50.safetensors",
                                       text_encoder_paths="models/text_encoders/t5xxl_fp16.safetensors",
                                       vae_path="models/vae/ae.safetensors", tokenizer_paths="", t5_max_length=0, quantize=False, clip_vision_path=""),
                  2000, dict(
        sets=settings("chroma_train", lr=1e-4, guidance_scale=4.0, sample_steps=26),
        sample=dict(prompt="sks in a forest", negative="low quality, blurry", width=1024, height=1024, steps=26,
                    guidance=4.0, seed=42),
        note=real_note.format(what="a LoRA for Chroma (T5 only).", name="chroma_train",
                              extra="Measured: 19.3 GiB peak at 1024 px on an H100 (bf16, rank 16).")), False))
    specs.append(("sd35_large_train", dict(arch="sd3", name_or_path="models/checkpoints/sd3.5_large.safetensors",
                                           text_encoder_paths="models/text_encoders/clip_l.safetensors\n"
                                                              "models/text_encoders/clip_g.safetensors\n"
                                                              "models/text_encoders/t5xxl_fp16.safetensors",
                                           vae_path="", tokenizer_paths="", t5_max_length=0, quantize=False, clip_vision_path=""), 2000, dict(
        sets=settings("sd35_large_train", lr=1e-4, timestep_type="shift", guidance_scale=4.5, sample_steps=28),
        sample=dict(prompt="sks in a forest", negative="", width=1024, height=1024, steps=28, guidance=4.5, seed=42),
        note=real_note.format(what="a LoRA for SD 3.5 Large (also Medium and Large Turbo).",
                              name="sd35_large_train",
                              extra="The text encoders are optional when the checkpoint carries them; without "
                                    "T5 its part of the prompt is zeros, as ComfyUI does.")), False))
    specs.append(("flex2_train", dict(arch="flex2", name_or_path="models/diffusion_models/Flex.2-preview.safetensors",
                                      text_encoder_paths="models/text_encoders/clip_l.safetensors\n"
                                                         "models/text_encoders/t5xxl_fp16.safetensors",
                                      vae_path="models/vae/ae.safetensors", tokenizer_paths="", t5_max_length=0, quantize=True, clip_vision_path=""),
                  2000, dict(
        ds=dataset(control_path="input/my_lora_dataset_control", control_dropout=0.1),
        sets=settings("flex2_train", lr=1e-4, timestep_type="flux_shift", guidance_scale=3.5),
        sample=dict(prompt="sks in a forest", negative="", width=1024, height=1024, steps=20, guidance=3.5, seed=42),
        note=real_note.format(what="a LoRA for Flex.2, with control images.", name="flex2_train",
                              extra="control_path: a folder of control images (depth, lines, pose) with the same "
                                    "file names as the training images; control_dropout trains some steps without.")),
                  False))

    wan_sets = dict(lr=1e-4, timestep_type="shift", guidance_scale=5.0, sample_steps=30, sample_width=832,
                    sample_height=480, sample_num_frames=81, blocks_to_swap="auto", offload_activations=True)
    wan_note = ("Measured on an H200 capped at 24 GiB (bench/wan_step.py): Wan 14B at 480x832, 81 frames, fp8 base + "
                "block swap (auto: 26 of 40 blocks) + activation offload: 18.6 s/step, 17.4 GiB peak. The dataset holds "
                "videos (.mp4 ...) with .txt captions; clips of 81 frames at 16 fps.")
    specs.append(("wan21_t2v_14b_train", dict(arch="wan21", name_or_path="models/diffusion_models/wan2.1_t2v_14B_bf16.safetensors",
                                              text_encoder_paths="models/text_encoders/umt5_xxl_fp16.safetensors",
                                              vae_path="models/vae/wan_2.1_vae.safetensors", tokenizer_paths="",
                                              t5_max_length=0, quantize=True, clip_vision_path=""), 2000, dict(
        ds=dataset(resolution="640", num_frames=81, caption_dropout_rate=0.05),
        sets=settings("wan21_t2v_14b_train", sample_prompts="[trigger] walking through a forest", **wan_sets),
        sample=dict(prompt="sks walking through a forest", negative="", width=832, height=480, steps=30, guidance=5.0,
                    seed=42, frames=81),
        note=real_note.format(what="a LoRA for Wan 2.1 T2V 14B on video clips.", name="wan21_t2v_14b_train",
                              extra=wan_note)), False))
    specs.append(("wan21_i2v_14b_train", dict(arch="wan21_i2v",
                                              name_or_path="models/diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors",
                                              text_encoder_paths="models/text_encoders/umt5_xxl_fp16.safetensors",
                                              vae_path="models/vae/wan_2.1_vae.safetensors", tokenizer_paths="",
                                              t5_max_length=0, quantize=True,
                                              clip_vision_path="models/clip_vision/clip_vision_h.safetensors"), 2000, dict(
        ds=dataset(resolution="640", num_frames=81, caption_dropout_rate=0.05, do_i2v=True),
        sets=settings("wan21_i2v_14b_train", sample_prompts="", **wan_sets),
        sample=dict(prompt="sks walking through a forest", negative="", width=832, height=480, steps=30, guidance=5.0,
                    seed=42, frames=81),
        note=real_note.format(what="a LoRA for Wan 2.1 I2V 14B: each clip's first frame is its start image (do_i2v).",
                              name="wan21_i2v_14b_train",
                              extra=wan_note + " The Sample node starts from the image in Load Image (put yours in "
                                               "ComfyUI's input folder); previews while training need "
                                               "sample.samples[].control_image in the YAML."), start_image="example.png"),
                  False))

    specs.append(("ltxv_2b_train", dict(arch="ltxv", name_or_path="models/checkpoints/ltx-video-2b-v0.9.5.safetensors",
                                        text_encoder_paths="models/text_encoders/t5xxl_fp16.safetensors",
                                        vae_path="", tokenizer_paths="", t5_max_length=0, quantize=False,
                                        clip_vision_path=""), 2000, dict(
        ds=dataset(resolution="512", num_frames=97, caption_dropout_rate=0.05),
        sets=settings("ltxv_2b_train", lr=1e-4, guidance_scale=3.0, sample_steps=30, sample_width=768,
                      sample_height=512, sample_num_frames=97, sample_prompts="[trigger] walking through a forest"),
        sample=dict(prompt="sks walking through a forest", negative="", width=768, height=512, steps=30, guidance=3.0,
                    seed=42, frames=97),
        note=real_note.format(what="a LoRA for LTX-Video 2B (0.9.x) on video clips.", name="ltxv_2b_train",
                              extra="The Lightricks checkpoint (models/checkpoints) holds the transformer and the VAE: "
                                    "leave vae_path empty. The dataset holds videos (.mp4 ...) with .txt captions; "
                                    "clips of 97 frames (8k+1) at 25 fps, sides multiples of 32. Image-to-video: set "
                                    "do_i2v (each clip's first frame is its start image). 13B (ltxv-13b-0.9.x-dev): "
                                    "set quantize and blocks_to_swap auto. Speed and memory: not measured yet.")),
                  False))

    specs.append(("hunyuan_video_13b_train", dict(
        arch="hunyuan_video", name_or_path="models/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors",
        text_encoder_paths="models/text_encoders/llava_llama3_fp16.safetensors\nmodels/text_encoders/clip_l.safetensors",
        vae_path="models/vae/hunyuan_video_vae_bf16.safetensors", tokenizer_paths="", t5_max_length=0, quantize=True,
        clip_vision_path=""), 2000, dict(
        ds=dataset(resolution="736", num_frames=33, caption_dropout_rate=0.05),
        sets=settings("hunyuan_video_13b_train", lr=1e-4, timestep_type="shift", guidance_scale=6.0, sample_steps=30,
                      sample_width=960, sample_height=544, sample_num_frames=33, blocks_to_swap="auto",
                      offload_activations=True, sample_prompts="[trigger] walking through a forest"),
        sample=dict(prompt="sks walking through a forest", negative="", width=960, height=544, steps=30, guidance=6.0,
                    seed=42, frames=33),
        note=real_note.format(what="a LoRA for HunyuanVideo 13B (text-to-video) on video clips.",
                              name="hunyuan_video_13b_train",
                              extra="Measured on an H200 capped at 24 GiB (bench/hunyuan_video_step.py): 544x960, 33 "
                                    "frames, fp8 base + block swap (auto) + activation offload: 12.4 s/step, 11.7 GiB "
                                    "peak. Guidance-distilled: trained with the guidance embedding at 1, previews at "
                                    "the Sample node's guidance. The Llama tokenizer is read from ComfyUI's "
                                    "comfy/text_encoders/llama_tokenizer (or tokenizer_paths). The dataset holds videos "
                                    "(.mp4 ...) with .txt captions; clips of 33 frames (4k+1) at 24 fps.")),
                  False))

    for name, model, steps, kw, demo in specs:
        nodes, edges = by_arch_workflow(name, model, steps, kw.pop("note"), **kw)
        wf = build(name, nodes, edges, classes)
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n", encoding="utf-8")
        header = (f"# The YAML twin of {name}.json: the same run (what that workflow's \"Export Training Job (YAML)\"\n"
                  f"# node writes{', with paths relative to this file' if demo else ''}).\n"
                  + ("#\n#   python -m trainer demo                                   # once: writes demo/models and demo/dataset\n"
                     f"#   python -m trainer example_workflows/{name}.yaml\n#\n"
                     "# from the repository root. The LoRA lands in demo/output/flux_demo_train/; run it again to resume.\n"
                     "# fp32 suits a CPU; on a GPU use `--set train.dtype=bf16`. No sample.prompts: the workflow samples with\n"
                     "# its \"Sample (training LoRA)\" node instead; to sample here, list sample.prompts.\n"
                     if demo else
                     f"#\n#   trainer custom_nodes/EriDiffusion/example_workflows/{name}.yaml   # from the ComfyUI folder\n"
                     "#\n# Paths are relative to the ComfyUI folder (relative paths not found beside this file are read\n"
                     "# from the current folder, with a warning): edit them to your files, absolute paths work anywhere.\n"))
        (OUT / f"{name}.yaml").write_text(twin_yaml(classes, nodes, steps, header, demo), encoding="utf-8")
        print(f"wrote {name}.json and {name}.yaml")

    # ComfyUI's own loaders -> training: any family ComfyUI loads (here Wan 2.1 T2V 1.3B, a video family)
    name = "wan21_comfy_model_train"
    nodes = [
        {"id": 1, "type": "UNETLoader", "pos": [40, 60], "size": [360, 110],
         "widgets": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}},
        {"id": 2, "type": "CLIPLoader", "pos": [40, 210], "size": [360, 130],
         "widgets": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}},
        {"id": 3, "type": "VAELoader", "pos": [40, 380], "size": [360, 80],
         "widgets": {"vae_name": "wan_2.1_vae.safetensors"}},
        {"id": 4, "type": "EriComfyModel", "pos": [440, 60], "size": [300, 120], "widgets": {}},
        {"id": 5, "type": "EriDataset", "pos": [440, 230], "size": [400, 460], "widgets": dataset(resolution="480, 640")},
        {"id": 6, "type": "EriNetwork", "pos": [440, 730], "size": [400, 300], "widgets": network(rank=32, alpha=32.0)},
        {"id": 7, "type": "EriTrainSettings", "pos": [880, 60], "size": [400, 760],
         "widgets": settings(name, lr=1e-4, timestep_type="shift", sample_prompts="")},
        {"id": 8, "type": "EriTrain", "pos": [1320, 60], "size": [340, 200], "widgets": {"steps": 1500}},
        {"id": 9, "type": "EriSaveLoRA", "pos": [1700, 60], "size": [340, 160],
         "widgets": {"filename": name, "subfolder": "eridiffusion", "dtype": "bf16"}},
        {"id": 10, "type": "Note", "pos": [40, 520], "size": [360, 300], "widgets": {"text": (
            "EriDiffusion: train on the MODEL that ComfyUI's own loaders hold (no second copy of the weights), here "
            "Wan 2.1 T2V 1.3B with its UMT5 text encoder and VAE. Any family ComfyUI loads trains this way: swap the "
            "loaders (Load Checkpoint, DualCLIPLoader ...).\n\nThe dataset's videos train as clips (num_frames, "
            "snapped to 4k+1) and its images as one-frame clips. The LoRA goes to models/loras/eridiffusion; load it with "
            "LoraLoaderModelOnly.\n\nNo YAML twin: a ComfyUI MODEL has no file path to export (Export Training "
            "Job refuses it; a YAML job can use model.backend: comfyui with the files instead).")}},
    ]
    edges = [(1, 0, 4, "model"), (2, 0, 4, "clip"), (3, 0, 4, "vae"), (4, 0, 8, "training_model"),
             (5, 0, 8, "datasets"), (6, 0, 8, "network"), (7, 0, 8, "settings"), (8, 0, 9, "state")]
    (OUT / f"{name}.json").write_text(json.dumps(build(name, nodes, edges, classes), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
