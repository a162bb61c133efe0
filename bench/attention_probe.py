"""The attention self-test (trainer/attention.py) at the shapes of several families, on this machine's card, each
group in its own child process as the trainer runs it, with the dispatcher's state beside it: which backend SDPA
picks at a Flux shape with cuDNN on in torch's own priority order, and the order itself.

    python3 bench/attention_probe.py            # GPU; one JSON line per family and the dispatcher's line
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from trainer import attention

# (batch, heads, query tokens, key tokens, head dim)
FAMILIES = {
    "flux_1024": [(1, 24, 4608, 4608, 128)],
    "flux_512": [(1, 24, 1536, 1536, 128)],
    "flux_768x1344": [(1, 24, 512 + 48 * 84, 512 + 48 * 84, 128)],
    "sdxl_1024": [(1, 10, 4096, 4096, 64), (1, 10, 4096, 77, 64), (1, 20, 1024, 1024, 64), (1, 20, 1024, 77, 64)],
    "sd35_large_1024": [(1, 38, 4096 + 333, 4096 + 333, 64)],
}


def dispatcher() -> dict:
    from torch.nn.attention import SDPBackend

    q = torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16)
    torch.backends.cuda.enable_cudnn_sdp(True)
    choice = torch._fused_sdp_choice(q, q, q)
    return {"priority_order": [SDPBackend(b).name for b in torch._C._get_sdp_priority_order()],
            "choice_with_cudnn_on_flux_1024": SDPBackend(choice).name, "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name()}


def main() -> None:
    os.environ["ERIDIFFUSION_CACHE"] = tempfile.mkdtemp()  # no verdict from an earlier run
    try:
        print(json.dumps(dispatcher()), flush=True)
    except (AttributeError, RuntimeError) as e:  # private API: the families' lines matter more
        print(json.dumps({"dispatcher": f"{type(e).__name__}: {e}"}), flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    dev = torch.device("cuda", 0)
    for name, shapes in FAMILIES.items():
        v = attention.self_test(shapes, torch.bfloat16, dev)
        print(json.dumps({"family": name, **v}), flush=True)


if __name__ == "__main__":
    main()
