"""`python -m trainer demo` on a fresh folder: the newcomer's first command."""

import subprocess
import sys

from safetensors import safe_open


def test_demo_runs_offline(tmp_path):
    out = tmp_path / "demo"
    env_cmd = [sys.executable, "-m", "trainer", "demo", "--out", str(out), "--steps", "2"]
    r = subprocess.run(env_cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lora = out / "output" / "demo_flux_lora" / "demo_flux_lora.safetensors"
    assert lora.exists() and "LoRA:" in r.stdout
    # the end says which file goes into which ComfyUI folder, and which loader reads it
    assert "models/diffusion_models/  flux_demo.safetensors   -> Load Diffusion Model" in r.stdout
    assert r.stdout.count("-> DualCLIPLoader (type flux)") == 2 and "models/loras/" in r.stdout
    assert len(list((out / "output" / "demo_flux_lora" / "samples").glob("*.png"))) == 6
    with safe_open(str(out / "models" / "flux_demo.safetensors"), "pt") as f:
        # what ComfyUI's detection reads: hidden 3072 in 24 heads of 128, a guidance embedding
        assert f.get_slice("img_in.weight").get_shape() == [3072, 64]
        assert f.get_slice("double_blocks.0.img_attn.norm.key_norm.scale").get_shape() == [128]
        assert "guidance_in.in_layer.weight" in f.keys()


def test_comfyui_guide_names_the_loader_each_layout_needs(tmp_path):
    """Separate files go to Load Diffusion Model + the CLIP loader + Load VAE (Kolors: the MZ node's loaders); a
    checkpoint holding the VAE beside separate text encoders (LTX-Video) to Load Checkpoint; a checkpoint with
    everything inside (SDXL) alone."""
    from trainer.demo import comfyui_guide
    from trainer.models.registry import get_family

    lora = tmp_path / "l.safetensors"
    flux = comfyui_guide({"name_or_path": "f.safetensors", "text_encoder_paths": ["a", "b"], "vae_path": "v"},
                         get_family("flux"), lora)
    assert "models/diffusion_models/  f.safetensors   -> Load Diffusion Model" in flux and "models/vae/" in flux
    ltx = comfyui_guide({"name_or_path": "x.safetensors", "text_encoder_paths": ["t5"]}, get_family("ltxv"), lora)
    assert "models/checkpoints/       x.safetensors   -> Load Checkpoint (the model and its VAE" in ltx
    assert "diffusion_models" not in ltx and "-> Load CLIP (type ltxv)" in ltx
    kolors = comfyui_guide({"name_or_path": "u.safetensors", "text_encoder_paths": ["glm"], "vae_path": "v"},
                           get_family("kolors"), lora)  # ComfyUI core has no Kolors: the MZ node's loaders
    assert f"{'models/unet/':<26}u.safetensors   -> MZ_KolorsUNETLoaderV2" in kolors
    assert f"{'models/LLM/':<26}glm   -> MZ_ChatGLM3Loader" in kolors and "diffusion_models" not in kolors
    sdxl = comfyui_guide({"name_or_path": "s.safetensors"}, get_family("sdxl"), lora)
    assert "-> Load Checkpoint (model, CLIP and VAE in one file)" in sdxl and "text_encoders" not in sdxl
