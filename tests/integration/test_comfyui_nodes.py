"""The EriDiffusion node pack inside a real ComfyUI server, driven through its HTTP API the way the frontend
drives it (POST /prompt with an API-format workflow, then GET /history/<id>).

Needs a ComfyUI install: set COMFYUI_PATH (its folder) and, unless `<COMFYUI_PATH>/../comfy-venv/bin/python`
exists, COMFYUI_PYTHON (a python that can import ComfyUI and has this repo's requirements). Skipped otherwise.

One ComfyUI process serves the whole module (`--cpu`, `--base-directory` a temp folder whose
custom_nodes/EriDiffusion links to this repository); it starts while the model files are written:
  * the engine's demo Flux files (`make_flux_demo`: hidden 3072, so ComfyUI would detect it too; tiny CLIP / T5 /
    VAE and tokenizers) for the by-arch path (EriModelByArch);
  * for the ComfyUI MODEL path, files ComfyUI's own loaders load (comfy_fixtures.flux_files): a Flux with 768-wide text inputs in
    models/diffusion_models (ComfyUI's T5-XXL is fixed-size, so the Flux is fed by CLIP-L alone), a CLIP-L of
    the real shape in models/text_encoders (CLIPLoader type stable_diffusion) and a Flux-shaped 16-channel VAE in
    models/vae, all with random weights;
  * a 4-image captioned dataset (64x64).
Workflows, in order (later ones use what earlier ones wrote):
  A  by arch: train 2 steps, save into models/loras/eri_test, sample (EriSample -> SaveImage);
  B  ComfyUI MODEL (UNETLoader + CLIPLoader + VAELoader -> EriComfyModel): train 2 steps, save, and apply the
     training LoRA to the MODEL (EriApplyLoRA) for a KSampler;
  C  ComfyUI's own LoraLoaderModelOnly loads B's file for a KSampler: no "lora key not loaded" in the log;
  the ComfyUI backend's LoRA gradients equal the engine's own Flux backend's (comfy_check_grads.py);
  E  EriExportJob writes a job that `python -m trainer` runs, and EriLoadJob reads it back into EriTrain;
  the example workflow (example_workflows/flux_demo_train.json) is valid for this server and describes the
  same run as its YAML twin.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration.comfy_env import comfy_install

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXAMPLES = REPO / "example_workflows"
STARTUP_TIMEOUT = 300  # s; ComfyUI imports torch while this process writes ~2.5 GB of model files
PROMPT_TIMEOUT = 600
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _comfy() -> tuple[Path, Path]:
    return comfy_install("ComfyUI node-pack test")


def _node_ids() -> list[str]:
    """The node_id of every class in nodes/__init__.py's NODES, read from the sources (this python may not
    be able to import comfy_api)."""
    init = ast.parse((REPO / "nodes" / "__init__.py").read_text())
    names = next(
        [e.id for e in n.value.elts]
        for n in ast.walk(init)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        and any(isinstance(t, ast.Name) and t.id == "NODES" for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets))
    )
    ids = {}
    for f in (REPO / "nodes").glob("*.py"):
        for cls in ast.walk(ast.parse(f.read_text())):
            if not isinstance(cls, ast.ClassDef):
                continue
            for call in ast.walk(cls):
                for kw in getattr(call, "keywords", []) if isinstance(call, ast.Call) else []:
                    if kw.arg == "node_id" and isinstance(kw.value, ast.Constant):
                        ids[cls.name] = kw.value.value
    missing = [n for n in names if n not in ids]
    assert not missing, f"no node_id found for {missing}"
    return [ids[n] for n in names]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the files ----------------------------------------------------------------------------------------------
def _write_files(base: Path) -> dict:
    import shutil

    from integration.comfy_fixtures import flux_files
    from helpers import make_images
    from trainer.demo.flux import write_flux_demo as make_flux_demo

    demo = make_flux_demo(base / "demo_models")
    models = base / "models"
    made = flux_files(base / "fixtures")
    files = {}
    for name, folder in (("unet", "diffusion_models"), ("clip", "text_encoders"), ("vae", "vae")):
        dest = models / folder / f"eri_flux_{name}.safetensors"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(made[name], dest)
        files[name] = dest
    data = make_images(base / "dataset", n=4, size=(64, 64))
    return {"demo": demo, **files, "data": data}


# --- the server ---------------------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    base: Path
    log_path: Path
    proc: subprocess.Popen
    files: dict
    python: Path
    comfy: Path
    results: dict = field(default_factory=dict)  # what one workflow hands to the next

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 6000) -> str:
        return self.log()[-n:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float = PROMPT_TIMEOUT) -> dict:
        """Queue an API-format workflow and wait for it; fail with ComfyUI's own error message."""
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                pid = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            pytest.fail(f"ComfyUI refused the workflow ({e.code}): {e.read().decode(errors='replace')[:4000]}")
        t0 = time.monotonic()
        while True:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                break
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({self.proc.returncode}) while running a workflow:\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"workflow still running after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)
        status = entry["status"]
        if status["status_str"] != "success":
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            if errors:
                e = errors[0]
                tb = "".join(e.get("traceback", []))[-3000:]
                pytest.fail(f"{e.get('node_type')} (node {e.get('node_id')}) failed: {e.get('exception_type')}: "
                            f"{e.get('exception_message')}\n{tb}")
            pytest.fail(f"workflow failed: {json.dumps(status)[:3000]}\n{self.log_tail()}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        return entry


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)  # its own session: ComfyUI and anything it started
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    comfy, python = _comfy()
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "EriDiffusion").symlink_to(REPO, target_is_directory=True)
    port = _free_port()
    log_path = base / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    cmd = [str(python), "main.py", "--cpu", "--base-directory", str(base), "--port", str(port), "--listen",
           "127.0.0.1", "--disable-auto-launch", "--log-stdout"]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(comfy), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        files = _write_files(base)  # while ComfyUI starts
        t_files = time.monotonic() - t0
        srv = Server(f"http://127.0.0.1:{port}", base, log_path, proc, files, python, comfy)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}) during startup:\n{srv.log_tail()}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > STARTUP_TIMEOUT:
                pytest.fail(f"ComfyUI not up after {STARTUP_TIMEOUT}s:\n{srv.log_tail()}")
            time.sleep(0.5)
        print(f"\nfiles written in {t_files:.0f}s, ComfyUI up after {time.monotonic() - t0:.0f}s "
              f"({base}, port {port})")
        yield srv
    finally:
        _stop(proc)


# --- workflow parts -----------------------------------------------------------------------------------------
def _dataset(folder: Path) -> dict:
    return {"class_type": "EriDataset", "inputs": {
        "folder_path": str(folder), "trigger_word": "sks", "caption_ext": "txt", "default_caption": "",
        "resolution": "64", "caption_dropout_rate": 0.0, "num_repeats": 1, "flip_x": False, "shuffle_tokens": False,
        "keep_tokens": 0, "cache_latents_to_disk": False}}


def _network() -> dict:
    return {"class_type": "EriNetwork", "inputs": {
        "type": "lora", "rank": 4, "alpha": 4.0, "conv_rank": 0, "conv_alpha": 0.0, "lokr_factor": -1,
        "lokr_full_rank": False, "only_if_contains": "", "ignore_if_contains": ""}}


def _settings(name: str, folder: Path) -> dict:
    return {"class_type": "EriTrainSettings", "inputs": {
        "name": name, "training_folder": str(folder), "lr": 1e-3, "optimizer": "adamw", "lr_scheduler": "constant",
        "lr_warmup_steps": 0, "batch_size": 1, "gradient_accumulation": 1, "timestep_type": "sigmoid",
        "dtype": "fp32", "gradient_checkpointing": False, "cache_text_embeddings": True, "seed": 42,
        "save_every": 1000, "save_dtype": "float16", "max_step_saves_to_keep": 1, "sample_every": 250,
        "sample_prompts": "", "sample_width": 64, "sample_height": 64, "sample_steps": 2, "guidance_scale": 3.5}}


def _by_arch(demo: dict) -> dict:
    return {"class_type": "EriModelByArch", "inputs": {
        "arch": "flux", "name_or_path": demo["name_or_path"], "text_encoder_paths": "\n".join(demo["text_encoder_paths"]),
        "vae_path": demo["vae_path"], "tokenizer_paths": "\n".join(demo["tokenizer_paths"])}}


def _comfy_loaders(srv: Server) -> dict:
    f = srv.files
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f["unet"].name, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": f["clip"].name, "type": "stable_diffusion",
                                                         "device": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f["vae"].name}},
    }


def _ksampler(model: list, clip: list, vae: list, image_node: str = "PreviewImage") -> dict:
    return {
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "sks, a red circle"}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["guided", 0], "negative": ["pos", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": vae}},
        "image": {"class_type": image_node, "inputs": {"images": ["decode", 0]}
                  | ({"filename_prefix": "eri_lora_loader"} if image_node == "SaveImage" else {})},
    }


def _lora_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _check_lora(path: Path, model_file: Path) -> list[str]:
    """ComfyUI's keys (`diffusion_model.<weight name without .weight>.<suffix>`) for weights the model file has,
    three tensors for each of the 13 layers of a 1 double + 1 single block Flux."""
    from safetensors import safe_open

    assert path.is_file(), f"no LoRA at {path}"
    keys = _lora_keys(path)
    bad = [k for k in keys if not (k.startswith("diffusion_model.") and k.endswith(LORA_SUFFIXES))]
    assert not bad, f"{path.name}: keys not in ComfyUI's LoRA layout: {bad[:5]}"
    modules = sorted({next(k[: -len(s)] for s in LORA_SUFFIXES if k.endswith(s)) for k in keys})
    with safe_open(str(model_file), "pt") as f:
        weights = set(f.keys())
    unknown = [m for m in modules if m[len("diffusion_model."):] + ".weight" not in weights]
    assert not unknown, f"{path.name}: LoRA layers the model does not have: {unknown[:5]}"
    assert len(modules) == 13 and len(keys) == 3 * 13, f"{path.name}: {len(modules)} layers, {len(keys)} tensors"
    assert any(".double_blocks.0." in m for m in modules) and any(".single_blocks.0." in m for m in modules)
    return modules


def _summary(entry: dict, node: str) -> str:
    text = entry["outputs"].get(node, {}).get("text")
    assert text, f"node {node} showed no text: {entry['outputs']}"
    return text[0]


# --- the tests ----------------------------------------------------------------------------------------------
def test_nodes_registered(server):
    info = server.get("/object_info")
    ids = _node_ids()
    missing = [n for n in ids if n not in info]
    assert not missing, f"not registered: {missing}\n{server.log_tail()}"
    for n in ids:
        assert info[n]["python_module"].endswith("EriDiffusion"), info[n]["python_module"]
    log = server.log()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-6000:]
    assert "EriDiffusion" in log  # listed among the imported custom nodes


def test_by_arch_train_save_sample(server):
    """A: EriModelByArch + dataset + network + settings -> EriTrain (2 steps) -> EriSaveLoRA and EriSample."""
    b, f = server.base, server.files
    prompt = {
        "model": _by_arch(f["demo"]), "data": _dataset(f["data"]), "net": _network(),
        "settings": _settings("eri_by_arch", b / "train_a"),
        "train": {"class_type": "EriTrain", "inputs": {"training_model": ["model", 0], "datasets": ["data", 0],
                                                         "network": ["net", 0], "settings": ["settings", 0], "steps": 2}},
        "save": {"class_type": "EriSaveLoRA", "inputs": {"state": ["train", 0], "filename": "eri_by_arch",
                                                         "subfolder": "eri_test", "dtype": "float16"}},
        "sample": {"class_type": "EriSample", "inputs": {"state": ["train", 0], "prompt": "sks, a red circle",
                                                         "negative": "", "width": 64, "height": 64, "steps": 2,
                                                         "guidance": 3.5, "seed": 1}},
        "image": {"class_type": "SaveImage", "inputs": {"images": ["sample", 0], "filename_prefix": "eri_sample"}},
    }
    entry = server.run(prompt)
    summary = _summary(entry, "train")
    assert summary.startswith("step 2, loss "), summary
    loss = float(re.search(r"loss (\S+),", summary).group(1))
    assert loss == loss and loss < 1e3, summary

    lora = b / "models" / "loras" / "eri_test" / "eri_by_arch.safetensors"
    assert _summary(entry, "save") == f"saved {lora}"
    _check_lora(lora, Path(f["demo"]["name_or_path"]))

    from PIL import Image

    saved = entry["outputs"]["image"]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    png = b / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    with Image.open(png) as im:
        assert im.size == (64, 64), im.size
    assert entry["outputs"]["sample"]["images"], "EriSample showed no preview"
    print(f"A (by arch): {entry['seconds']}s, {summary}")


def test_image_dataset_from_the_graph_trains(server):
    """E: an IMAGE batch from the graph (EmptyImage: 2 images, two colors via ImageBatch) with a caption per line ->
    Training Dataset (from images) -> EriTrain 2 steps; the folder it wrote holds both images and captions, and a
    second run with the same inputs writes nothing new."""
    b, f = server.base, server.files

    def prompt(name: str) -> dict:
        return {
            "red": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                           "color": 0xFF0000}},
            "blue": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                            "color": 0x0000FF}},
            "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["red", 0], "image2": ["blue", 0]}},
            "data": {"class_type": "EriImageDataset", "inputs": {
                "images": ["batch", 0], "captions": "sks, a red square\nsks, a blue square", "trigger_word": "sks",
                "resolution": "64", "caption_dropout_rate": 0.0, "num_repeats": 1, "flip_x": False,
                "shuffle_tokens": False, "keep_tokens": 0, "cache_latents_to_disk": False}},
            "model": _by_arch(f["demo"]), "net": _network(), "settings": _settings(name, b / "train_e"),
            "train": {"class_type": "EriTrain", "inputs": {"training_model": ["model", 0], "datasets": ["data", 0],
                                                             "network": ["net", 0], "settings": ["settings", 0],
                                                             "steps": 2}},
        }

    entry = server.run(prompt("eri_images"))
    summary = _summary(entry, "train")
    assert summary.startswith("step 2, loss "), summary
    folders = sorted((b / "output" / "eridiffusion" / "datasets").iterdir())
    assert len(folders) == 1, folders
    written = sorted(p.name for p in folders[0].iterdir() if p.is_file())  # (and the trainer's own _latent_cache)
    assert written == ["00000.png", "00000.txt", "00001.png", "00001.txt"], written
    assert (folders[0] / "00001.txt").read_text(encoding="utf-8") == "sks, a blue square"
    from PIL import Image

    with Image.open(folders[0] / "00000.png") as im:
        assert im.size == (64, 64) and im.getpixel((3, 3)) == (255, 0, 0)
    mtime = (folders[0] / "00000.png").stat().st_mtime_ns
    server.run(prompt("eri_images_again"))
    assert sorted((b / "output" / "eridiffusion" / "datasets").iterdir()) == folders
    assert (folders[0] / "00000.png").stat().st_mtime_ns == mtime
    print(f"E (images from the graph): {entry['seconds']}s, {summary}")


def test_comfy_model_train_save_apply(server):
    """B: ComfyUI's loaders -> EriComfyModel -> EriTrain (2 steps) -> EriSaveLoRA; and EriApplyLoRA -> KSampler."""
    b, f = server.base, server.files
    prompt = {
        **_comfy_loaders(server),
        "tm": {"class_type": "EriComfyModel", "inputs": {"model": ["unet", 0], "clip": ["clip", 0], "vae": ["vae", 0]}},
        "data": _dataset(f["data"]), "net": _network(), "settings": _settings("eri_comfy", b / "train_b"),
        "train": {"class_type": "EriTrain", "inputs": {"training_model": ["tm", 0], "datasets": ["data", 0],
                                                         "network": ["net", 0], "settings": ["settings", 0], "steps": 2}},
        "save": {"class_type": "EriSaveLoRA", "inputs": {"state": ["train", 0], "filename": "eri_comfy",
                                                         "subfolder": "eri_test", "dtype": "float16"}},
        "apply": {"class_type": "EriApplyLoRA", "inputs": {"state": ["train", 0], "model": ["unet", 0], "strength": 1.0}},
        **_ksampler(["apply", 0], ["clip", 0], ["vae", 0]),
    }
    entry = server.run(prompt)
    summary = _summary(entry, "train")
    assert summary.startswith("step 2, loss "), summary
    lora = b / "models" / "loras" / "eri_test" / "eri_comfy.safetensors"
    assert _summary(entry, "save") == f"saved {lora}"
    _check_lora(lora, f["unet"])
    assert entry["outputs"]["image"]["images"], "no image from KSampler on the EriApplyLoRA model"
    log = server.log()
    for bad in ("clip missing", "unet missing", "lora key not loaded"):
        assert bad not in log, f"{bad!r} in ComfyUI's log:\n" + "\n".join(l for l in log.splitlines() if bad in l)[:3000]
    server.results["comfy_lora"] = lora
    print(f"B (ComfyUI MODEL): {entry['seconds']}s, {summary}")


def test_saved_lora_in_lora_loader(server):
    """C: ComfyUI's LoraLoaderModelOnly takes every tensor of B's file and a KSampler runs with it."""
    lora = server.results.get("comfy_lora")
    assert lora is not None, "needs the LoRA that test_comfy_model_train_save_apply saves"
    rel = lora.relative_to(server.base / "models" / "loras").as_posix()
    before = server.log().count("lora key not loaded")
    prompt = {
        **_comfy_loaders(server),
        "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": rel,
                                                                 "strength_model": 1.0}},
        **_ksampler(["lora", 0], ["clip", 0], ["vae", 0], image_node="SaveImage"),
    }
    entry = server.run(prompt)
    assert entry["outputs"]["image"]["images"], entry["outputs"]
    log = server.log()
    not_loaded = [l for l in log.splitlines() if "lora key not loaded" in l]
    assert not not_loaded and before == 0, "ComfyUI did not load:\n" + "\n".join(not_loaded[:20])
    print(f"C (LoraLoaderModelOnly + KSampler): {entry['seconds']}s")


def test_comfy_backend_gradients_match_engine(server, tmp_path):
    """The LoRA gradients through ComfyUI's Flux (weights loaded in inference mode, comfy_kitchen RoPE,
    in-place residual adds) equal those through the engine's diffusers Flux on the same file."""
    report = tmp_path / "grads.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cmd = [str(server.python), str(HERE / "comfy_check_grads.py"), "--comfyui", str(server.comfy), "--repo",
           str(REPO), "--model", str(server.files["unet"]), "--report", str(report)]
    proc = subprocess.run(cmd, cwd=str(server.comfy), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"comfy_check_grads.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r = json.loads(report.read_text())
    assert r["targets_comfy"] == r["targets_flux"] and len(r["targets_comfy"]) == 13, r
    assert r["grad_keys_equal"], r
    assert not r["base_requires_grad"] and not r["base_inference_tensors"], r
    assert r["grad_norm"] > 1e-3, r
    print(f"ComfyUI vs engine Flux: prediction rel err {r['pred_rel_err']:.1e}, gradient rel err {r['grad_rel_err']:.1e}")
    assert r["pred_rel_err"] < 1e-4 and r["grad_rel_err"] < 1e-3, r


def test_export_job_runs_in_cli_and_loads_back(server):
    """E: EriExportJob writes a job file; `python -m trainer` runs it; EriLoadJob feeds it back to EriTrain."""
    b, f = server.base, server.files
    job = b / "output" / "jobs" / "eri_export.yaml"  # Export writes inside ComfyUI's output folder only
    parts = {"model": _by_arch(f["demo"]), "data": _dataset(f["data"]), "net": _network(),
             "settings": _settings("eri_export", b / "train_e")}
    entry = server.run({**parts, "export": {"class_type": "EriExportJob", "inputs": {
        "training_model": ["model", 0], "datasets": ["data", 0], "network": ["net", 0], "settings": ["settings", 0],
        "steps": 2, "path": "jobs/eri_export.yaml"}}})
    assert _summary(entry, "export").startswith(f"wrote {job}")
    assert job.is_file()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainer", str(job), "--set", "train.steps=1"], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"python -m trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    final = b / "train_e" / "eri_export" / "eri_export.safetensors"
    assert final.is_file(), proc.stdout[-3000:]
    t_cli = time.monotonic() - t0
    assert sorted(_lora_keys(final)) == sorted(_lora_keys(b / "models" / "loras" / "eri_test" / "eri_by_arch.safetensors"))

    entry = server.run({
        "job": {"class_type": "EriLoadJob", "inputs": {"path": str(job)}},
        "train": {"class_type": "EriTrain", "inputs": {"training_model": ["job", 0], "datasets": ["job", 1],
                                                         "network": ["job", 2], "settings": ["job", 3], "steps": 1}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["train", 1]}},
    })
    summary = _summary(entry, "show")
    # the job's training folder holds the CLI's run (step 1): the node continues it, and says so
    assert summary.startswith("continued the earlier run in ") and "from step 1" in summary, summary
    assert re.search(r"step 2, loss \S+, saves in .*train_e", summary), summary
    print(f"E: CLI run {t_cli:.0f}s; EriLoadJob -> EriTrain {entry['seconds']}s, {summary}")


# --- the example workflow -----------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widget_names(spec: dict) -> list[str]:
    """The widget inputs of a node, in the order the frontend stores their values (required, then optional)."""
    names = []
    for group in ("required", "optional"):
        for name in spec.get("input_order", {}).get(group, []):
            t = spec["input"][group][name][0]
            if isinstance(t, list) or t in WIDGET_TYPES:
                names.append(name)
                if (spec["input"][group][name][1:] or [{}])[0].get("control_after_generate"):
                    names.append(None)  # the frontend's "fixed / randomize" value follows the seed
    return names


def ui_to_api(workflow: dict, info: dict) -> dict:
    """A UI-format workflow (what the frontend saves) as an API-format prompt, checked against /object_info."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):  # the frontend's own, never sent to the server
            continue
        spec = info.get(node["type"])
        assert spec is not None, f"node {node['id']}: unknown type {node['type']}"
        names = _widget_names(spec)
        values = node.get("widgets_values", [])
        assert len(values) == len(names), f"{node['type']}: {len(values)} widget values for {names}"
        inputs = {n: v for n, v in zip(names, values) if n is not None}
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            lid, src, slot, dst, dslot, typ = links[inp["link"]]
            assert dst == node["id"], f"link {lid} does not end at node {node['id']}"
            src_node = next(n for n in workflow["nodes"] if n["id"] == src)
            out_type = info[src_node["type"]]["output"][slot]
            assert typ == out_type == inp["type"], f"link {lid}: {typ} / {out_type} / {inp['type']}"
            inputs[inp["name"]] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


WORKFLOWS = sorted(p.stem for p in EXAMPLES.glob("*.json"))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_is_the_yaml_twin(server, name):
    """Each example workflow loads on this server (every node, widget and link checks out); a by-arch one
    describes the run of its YAML twin (EriExportJob over its parts writes the twin's job); a ComfyUI-MODEL one
    (no file paths to export) feeds ComfyUI's own loaders into EriComfyModel."""
    import yaml

    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    info = server.get("/object_info")
    prompt = ui_to_api(workflow, info)
    by_type = {}
    for nid, n in prompt.items():
        by_type.setdefault(n["class_type"], []).append(nid)
    for t in ("EriDataset", "EriNetwork", "EriTrainSettings", "EriTrain", "EriSaveLoRA"):
        assert len(by_type.get(t, [])) == 1, f"expected one {t}: {by_type}"
    train = prompt[by_type["EriTrain"][0]]["inputs"]
    twin_path = EXAMPLES / f"{name}.yaml"
    if "EriComfyModel" in by_type:
        assert not twin_path.exists(), f"{twin_path.name}: a ComfyUI-MODEL workflow has no runnable twin"
        cm = prompt[by_type["EriComfyModel"][0]]["inputs"]
        assert [prompt[cm[k][0]]["class_type"] for k in ("model", "clip", "vae")] == ["UNETLoader", "CLIPLoader",
                                                                                      "VAELoader"], cm
        assert train["training_model"][0] == by_type["EriComfyModel"][0]
        return
    twin = yaml.safe_load(twin_path.read_text())
    out = server.base / "output" / "jobs" / f"{name}_export.yaml"
    parts = {k: v for k, v in prompt.items() if v["class_type"] in
             ("EriModelByArch", "EriDataset", "EriNetwork", "EriTrainSettings")}
    parts["export"] = {"class_type": "EriExportJob", "inputs": {
        "training_model": train["training_model"], "datasets": train["datasets"], "network": train["network"],
        "settings": train["settings"], "steps": train["steps"], "path": f"jobs/{name}_export.yaml"}}
    server.run(parts)
    exported = yaml.safe_load(out.read_text())

    # paths: Export writes them absolute (resolved in ComfyUI's working folder, as the nodes read them); the twin's
    # are relative to ComfyUI's folder (the demo's: custom_nodes/EriDiffusion/demo/..., its YAML's to the repository
    # root: demo/...); the training folder: ComfyUI's output vs demo/output
    def norm(job: dict) -> dict:
        proc = job["config"]["process"][0]
        proc.pop("training_folder", None)
        text = json.dumps(job).replace(f"{server.comfy.resolve()}/", "").replace("custom_nodes/EriDiffusion/", "")
        text = text.replace('"../demo/', '"demo/')  # the demo twin's paths are relative to its own folder
        return json.loads(text)

    assert exported["config"]["process"][0]["datasets"][0]["folder_path"].startswith(str(server.comfy.resolve()))
    assert norm(exported) == norm(twin)
    if name == "flux_demo_train":
        from trainer.config import load_job_file

        job = load_job_file(str(twin_path), [])  # from any folder: the paths are relative to the file
        assert job.process.model.name_or_path == str(REPO / "demo" / "models" / "flux_demo.safetensors")
        assert job.process.datasets[0].folder_path == str(REPO / "demo" / "dataset")


def test_hostile_paths_are_refused_over_http(server):
    """Export writes .yaml files inside ComfyUI's output only and never over a file it did not write; Save LoRA
    names cannot leave models/loras (each refused with a message naming the input, nothing written)."""
    b, f = server.base, server.files
    victim = b / "output" / "not_a_job.yaml"
    victim.write_text("precious: true\n")
    parts = {"model": _by_arch(f["demo"]), "data": _dataset(f["data"]), "net": _network(),
             "settings": _settings("eri_hostile", b / "train_h")}
    for path, msg in (("../escape.yaml", "'..' is not allowed"), ("/tmp/abs.yaml", "is an absolute path"),
                      ("jobs/x.txt", "must end in .yaml"), ("not_a_job.yaml", "not a job this node wrote")):
        with pytest.raises(pytest.fail.Exception, match=re.escape(msg)):
            server.run({**parts, "export": {"class_type": "EriExportJob", "inputs": {
                "training_model": ["model", 0], "datasets": ["data", 0], "network": ["net", 0],
                "settings": ["settings", 0], "steps": 1, "path": path}}})
    assert victim.read_text() == "precious: true\n" and not (b / "escape.yaml").exists()
    for filename, subfolder, msg in (("../../../x", "eri", "Save LoRA filename"), ("ok", "../loras_evil", "'..'"),
                                     ("ok", "/tmp", "absolute path"), ("a\u0000b", "eri", "Save LoRA filename")):
        with pytest.raises(pytest.fail.Exception, match=re.escape(msg)):
            server.run({**parts,
                        "train": {"class_type": "EriTrain", "inputs": {"training_model": ["model", 0],
                                  "datasets": ["data", 0], "network": ["net", 0], "settings": ["settings", 0],
                                  "steps": 1}},
                        "save": {"class_type": "EriSaveLoRA", "inputs": {"state": ["train", 0], "filename": filename,
                                                                          "subfolder": subfolder, "dtype": "float16"}}})
    assert not (b / "models" / "loras_evil").exists() and not (b / "x.safetensors").exists()
