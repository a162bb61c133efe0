"""`python -m trainer demo --arch <family>` trains on a random checkpoint that real ComfyUI detects as that
family: each family's demo file goes through ComfyUI's own detection (comfy.model_detection, what Load
Diffusion Model / Load Checkpoint run). Needs COMFYUI_PATH (see comfy_env.py); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.comfy_env import comfy_install

# what ComfyUI calls each family (its supported_models class); Flex.1 / Flex.2 are Flux-layout models
EXPECTED = {"flux": "Flux", "flex1": "Flux", "flex2": "Flux", "chroma": "Chroma", "sdxl": "SDXL", "sd3": "SD3",
            "wan21": "WAN21_T2V", "wan21_i2v": "WAN21_I2V", "wan21_vace": "WAN21_Vace"}

DETECT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import comfy.model_detection as md
import comfy.utils
sd = comfy.utils.load_torch_file(sys.argv[2])
prefix = md.unet_prefix_from_state_dict(sd)  # as comfy.sd.load_diffusion_model_state_dict strips it
stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
cfg = md.model_config_from_unet(stripped or sd, "")
print(json.dumps({"class": type(cfg).__name__ if cfg is not None else None, "prefix": prefix}))
"""


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_demo_checkpoint_is_detected_by_comfyui(arch: str, tmp_path: Path) -> None:
    comfy, python = comfy_install(f"demo detection test ({arch})")
    from trainer.demo import DEMO_WRITERS

    assert arch in DEMO_WRITERS, f"{arch} has no demo"
    model = DEMO_WRITERS[arch](tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run([str(python), "-c", DETECT, str(comfy), model["name_or_path"]], cwd=str(comfy), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["class"] == EXPECTED[arch], f"{arch} demo {model['name_or_path']}: ComfyUI detects {found}"
