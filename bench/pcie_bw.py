"""Host <-> card copy bandwidth through PyTorch (pinned, 1 GiB, median of 5 after a warm-up), for the 24 GB
prediction's overlap (bench/predict_4090.py). Prints one JSON line."""

import json

import torch

n = 2**30
host = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_(0, 255)
dev = torch.empty(n, dtype=torch.uint8, device="cuda")


def rate(fn) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(n / (a.elapsed_time(b) / 1e3) / 1e9)
    return sorted(out)[2]


print(json.dumps({"h2d_gb_s": round(rate(lambda: dev.copy_(host, non_blocking=True)), 1),
                  "d2h_gb_s": round(rate(lambda: host.copy_(dev, non_blocking=True)), 1),
                  "device": torch.cuda.get_device_name()}), flush=True)
