"""Runs INSIDE ComfyUI's own python: ComfyUI's diffusion models of families the trainer trains through ComfyUI's
MODEL, built at full size on the meta device (no weights), and what the trainer's ComfyUI backend makes of
them: its targets (stacks, count, the first keys, what it leaves out) and repeated blocks.

    cd <ComfyUI> && <comfy python> comfy_check_targets.py --trainer <repo> --report result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot


def builders():
    import comfy.ldm.hidream.model as hidream
    import comfy.ldm.hunyuan_video.model as hunyuan
    import comfy.ldm.lightricks.model as ltxv
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.omnigen.omnigen2 as omnigen2
    import comfy.ldm.qwen_image.model as qwen
    import comfy.ldm.wan.model as wan

    return {
        # Z-Image (Lumina2's NextDiT with Z-Image's modulation), as ComfyUI's detection configures it
        "z_image": lambda **o: lumina.NextDiT(patch_size=2, in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                                              n_heads=30, n_kv_heads=30, cap_feat_dim=2560, qk_norm=True,
                                              z_image_modulation=True, axes_dims=[32, 48, 48], **o),
        "omnigen2": lambda **o: omnigen2.OmniGen2Transformer2DModel(**o),
        "hidream": lambda **o: hidream.HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, num_layers=16, num_single_layers=32, caption_channels=[4096, 4096],
            llama_layers=list(range(48)), **o),
        # HunyuanVideo T2V 13B as ComfyUI's detection configures it
        "hunyuan_video": lambda **o: hunyuan.HunyuanVideo(
            image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=20, depth_single_blocks=40, axes_dim=[16, 56, 56],
            theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
            use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False, **o),
        "qwen_image": lambda **o: qwen.QwenImageTransformer2DModel(**o),
        "ltxv": lambda **o: ltxv.LTXVModel(**o),
        "wan22_5b": lambda **o: wan.WanModel(model_type="t2v", patch_size=(1, 2, 2), dim=3072, ffn_dim=14336,
                                             num_layers=30, num_heads=24, in_dim=48, out_dim=48, **o),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    boot(a.comfyui, a.trainer)  # ComfyUI first: its `nodes` (Flux2Scheduler's module imports it), not ours

    import torch

    import comfy.ops
    from trainer.models.comfy import block_stacks, default_targets, repeated_layers

    report = {}
    for name, build in builders().items():
        try:
            with torch.device("meta"):
                dm = build(device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
        except Exception as e:  # a constructor this ComfyUI version changed: say so, do not guess
            report[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        targets = default_targets(dm)
        linear_keys = [f"diffusion_model.{n}" for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)]
        chosen = {t.key for t in targets}
        report[name] = {"class": type(dm).__name__, "stacks": [s for s, _ in block_stacks(dm)],
                        "targets": len(targets), "keys": sorted(chosen)[:3],
                        "left_out": sorted(k for k in linear_keys if k not in chosen),
                        "blocks": len(repeated_layers(dm)),
                        "shared_expert_targets": sum(".shared_experts." in k for k in chosen)}
    # the training shift on ComfyUI's Flux schedule, per model config (ComfyUI's own sampling settings)
    import comfy.model_base
    import comfy.supported_models as sm
    from trainer.models.comfy import flow_shift_mu

    shifts = {}
    # Flux.2 as ComfyUI's detection configures it (patch 1) and its 1024x1024 latent (128 channels at 16x)
    configs, latents = {"Flux2": {"patch_size": 1}}, {"Flux2": (1, 128, 64, 64)}
    flux, flow = comfy.model_base.ModelType.FLUX, comfy.model_base.ModelType.FLOW  # what model_base gives each
    for cls, kind in (("Flux", flux), ("Chroma", flux), ("Flux2", flux), ("LTXV", flux), ("SD3", flow),
                      ("WAN21_T2V", flow)):
        cfg = getattr(sm, cls)(configs.get(cls, {}))
        sampling = comfy.model_base.model_sampling(cfg, kind)
        shifts[cls] = flow_shift_mu(cfg, sampling, latents.get(cls, (1, 16, 128, 128)))
    report["shift_mu_1024"] = shifts
    # Flux.2 follows the resolution as ComfyUI's Flux2Scheduler samples it (its mu at 50 steps)
    from comfy_extras.nodes_flux import compute_empirical_mu

    flux2 = sm.Flux2(configs["Flux2"])
    sampling = comfy.model_base.model_sampling(flux2, flux)
    sizes = (512, 1024, 2048)
    report["flux2_shift_mu"] = {str(px): flow_shift_mu(flux2, sampling, (1, 128, px // 16, px // 16)) for px in sizes}
    report["flux2_scheduler_mu"] = {str(px): compute_empirical_mu((px // 16) ** 2, 50) for px in sizes}
    # which ComfyUI models this path refuses for want of their conditioning (configs as ComfyUI's detection makes them)
    from trainer.models.comfy import missing_conditioning

    configs = {"WAN21_T2V": {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16},
               "WAN21_I2V": {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 36},
               "WAN21_Vace": {"image_model": "wan2.1", "model_type": "vace", "in_dim": 16},
               "WAN21_FunControl2V": {"image_model": "wan2.1", "model_type": "i2v", "in_dim": 48, "out_dim": 16},
               "WAN22_T2V": {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 48, "out_dim": 48},
               "Flux": {"image_model": "flux", "in_channels": 16}, "FluxInpaint": {"image_model": "flux", "in_channels": 96},
               "SDXL": {"context_dim": 2048, "in_channels": 4, "adm_in_channels": 2816},
               "LTXV": {"image_model": "ltxv", "in_channels": 128}, "QwenImage": {"image_model": "qwen_image", "in_channels": 64}}
    report["missing_conditioning"] = {n: missing_conditioning(getattr(sm, n)(c)) for n, c in configs.items()}
    inpaint = sm.SDXL({"context_dim": 2048, "in_channels": 9, "adm_in_channels": 2816})
    report["missing_conditioning"]["SDXL_inpaint"] = missing_conditioning(inpaint)
    # Wan 2.2 I2V A14B: 36 input channels, no CLIP-vision keys, detected as WAN21_T2V
    a14b_i2v = sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "in_dim": 36, "out_dim": 16})
    report["missing_conditioning"]["WAN21_T2V_i2v"] = missing_conditioning(a14b_i2v)
    from trainer.models.comfy import conditioning_node

    report["conditioning_node"] = {n: getattr(conditioning_node(getattr(sm, n)(c)), "name", None)
                                   for n, c in configs.items()}
    report["conditioning_node"]["WAN21_T2V_i2v"] = conditioning_node(a14b_i2v).name
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
