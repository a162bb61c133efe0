"""Network types against an independent implementation (lycoris-lora), per fused layer of a tiny Flux.

For each type the saved tensors, loaded into LyCORIS's own module over a plain Linear holding the
fused original weight (as ComfyUI holds it), must reproduce what our hooks compute on the diffusers
modules; parameter counts follow each type's formula; training lowers the loss; files reload.
"""

import math

import pytest
import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models.flux import load_flux
from trainer.networks.base import factorization
from trainer.networks.network import Network

TYPES = ["lora", "locon", "loha", "lokr", "lokr_full", "dora"]


def _net(model, kind: str, rank: int = 4, alpha: float = 2.0, factor: int = -1) -> Network:
    t = "lokr" if kind.startswith("lokr") else kind
    return Network(model.targets(), t, rank, alpha, factor=factor, full_rank=kind == "lokr_full")


@pytest.fixture(scope="module")
def model(tiny_flux):
    cfg = ModelConfig(**{k: v for k, v in tiny_flux.items() if k != "arch"})
    return load_flux(cfg, "cpu", torch.float32)


def _randomize(net: Network, seed: int = 0) -> None:
    """As if trained: every parameter non-zero (zero-initialized halves included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lycoris_module(kind: str, linear: nn.Linear, rank: int, alpha: float, factor: int):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    if kind in ("lora", "locon", "dora"):
        return LoConModule("x", linear, 1.0, rank, alpha, weight_decompose=kind == "dora", wd_on_out=False)
    if kind == "loha":
        return LohaModule("x", linear, 1.0, rank, alpha)
    return LokrModule("x", linear, 1.0, rank, alpha, factor=factor, full_matrix=kind == "lokr_full")


@pytest.mark.parametrize("kind", TYPES)
def test_saved_tensors_reproduce_outputs_in_lycoris(model, kind):
    rank, alpha, factor = 4, 2.0, 2  # factor 2: dims 32 -> (2, 16), so plain lokr keeps a low-rank w2
    net = _net(model, kind, rank, alpha, factor)
    if kind == "lokr":
        assert not any(a.full for a in net.adapters.values())
    _randomize(net)
    net.attach()
    exported = net.export(torch.float32)
    g = torch.Generator().manual_seed(1)
    try:
        for key, t in net.targets.items():
            x = torch.randn(3, t.in_features, generator=g)
            with torch.no_grad():
                ours = torch.cat([m.module(x) for m in t.members], dim=-1)
            fused = nn.Linear(t.in_features, t.out_features)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([m.module.weight for m in t.members]))
                fused.bias.copy_(torch.cat([m.module.bias for m in t.members]))
            lm = _lycoris_module(kind, fused, rank, alpha, factor)
            sd = {k[len(key) + 1:]: v for k, v in exported.items() if k.startswith(key + ".")}
            missing, unexpected = lm.load_state_dict(sd, strict=False)
            assert not unexpected, unexpected
            # a full-rank LoKr has scale 1 and no alpha, in LyCORIS and ComfyUI alike
            allowed = ("scalar", "alpha") if kind == "lokr_full" else ("scalar",)
            assert all(m in allowed for m in missing), missing
            lm.apply_to()
            with torch.no_grad():
                theirs = fused(x)
            base = nn.functional.linear(x, fused.weight, fused.bias)
            assert (theirs - base).abs().max() > 1e-3, "the update must matter"
            err = float((ours - theirs).abs().max() / theirs.abs().max())
            assert err < 1e-4, (key, err)
    finally:
        net.detach()


def _expected_params(kind: str, i: int, o: int, r: int, factor: int) -> int:
    if kind in ("lora", "locon"):
        return r * (i + o)
    if kind == "dora":
        return r * (i + o) + i
    if kind == "loha":
        return 2 * r * (i + o)
    in_m, in_n = factorization(i, factor)
    out_l, out_k = factorization(o, factor)
    if kind == "lokr_full" or r >= max(out_k, in_n) / 2:
        return out_l * in_m + out_k * in_n
    return out_l * in_m + out_k * r + r * in_n


@pytest.mark.parametrize("kind", TYPES)
def test_parameter_count_formula(model, kind):
    net = _net(model, kind, rank=2, factor=-1)
    for key, t in net.targets.items():
        got = sum(p.numel() for p in net.adapter(key).parameters())
        assert got == _expected_params(kind, t.in_features, t.out_features, 2, -1), key


def test_factorization():
    assert factorization(3072, -1) == (48, 64)
    assert factorization(128, 8) == (8, 16)
    assert factorization(96, 4) == (4, 24)
    assert factorization(127, -1) == (1, 127)
    for d in (32, 96, 160, 3072, 9216, 21504):
        m, n = factorization(d)
        assert m * n == d and m <= n


@pytest.mark.parametrize("kind", TYPES)
def test_training_lowers_loss_on_fixed_batch(model, kind):
    torch.manual_seed(0)
    net = _net(model, kind, rank=4, alpha=4.0).attach()
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.7])
    cond = model.encode_text(["sks, a red circle", "sks, a blue square"])
    obj = model.objective
    noisy, target = obj.add_noise(latents, noise, sigmas), obj.target(latents, noise, sigmas)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    try:
        for _ in range(5):
            loss = ((model.predict(noisy, sigmas, cond, guidance=1.0) - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        net.detach()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.98, losses


@pytest.mark.parametrize("kind", TYPES)
def test_file_round_trip_continues_training(model, kind, tmp_path):
    """export -> file -> a new network (`pretrained_lora_path`) gives the same outputs."""
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.files import load_state_dict

    a = _net(model, kind, factor=4)
    _randomize(a, seed=3)
    path = tmp_path / "n.safetensors"
    save_safetensors_atomic(a.export(torch.float32), path)
    b = _net(model, kind, factor=4)
    b.import_(load_state_dict(path), str(path))
    g = torch.Generator().manual_seed(4)
    noisy, sigmas = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5])
    cond = {"t5": torch.randn(1, 8, 32, generator=g), "pooled": torch.randn(1, 64, generator=g)}
    outs = []
    for net in (a, b):
        net.attach()
        with torch.no_grad():
            outs.append(model.predict(noisy, sigmas, cond))
        net.detach()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_wrong_file_for_network_is_clear(model, tmp_path):
    from trainer.errors import UserError

    lora = _net(model, "lora")
    lokr = _net(model, "lokr")
    with pytest.raises(UserError, match="missing lokr_w1|lokr"):
        lokr.import_(lora.export(), "f.safetensors")


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "lokr_full"])
def test_conv_layers_match_lycoris(kind):
    """Conv targets (UNet families): the k x k down / 1x1 up LoCon form and the conv forms of LoHa/LoKr."""
    from trainer.models.base import Target, TargetMember

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1)
    target = Target("diffusion_model.input_blocks.1.0.in_layers.2", 32, 64, [TargetMember(conv, slice(0, 64))],
                    kind="conv")
    t = "lokr" if kind.startswith("lokr") else kind
    rank, alpha, factor = 4, 2.0, 4
    net = Network([target], t, rank, alpha, conv_rank=rank, conv_alpha=alpha, factor=factor,
                  full_rank=kind == "lokr_full")
    _randomize(net)
    net.attach()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        ours = conv(x)
    net.detach()
    sd = {k[len(target.key) + 1:]: v for k, v in net.export(torch.float32).items()}
    ref = nn.Conv2d(32, 64, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    lm = _lycoris_module("lora" if kind == "locon" else kind, ref, rank, alpha, factor)
    _, unexpected = lm.load_state_dict(sd, strict=False)
    assert not unexpected
    lm.apply_to()
    with torch.no_grad():
        theirs = ref(x)
    assert (theirs - conv(x)).abs().max() > 1e-3
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4


def test_conv_targets_need_a_conv_rank():
    from trainer.models.base import Target, TargetMember

    conv = nn.Conv2d(8, 8, 3)
    lin = nn.Linear(8, 8)
    targets = [Target("c", 8, 8, [TargetMember(conv, slice(0, 8))], kind="conv"),
               Target("l", 8, 8, [TargetMember(lin, slice(0, 8))])]
    assert set(Network(targets, "lora", 2, 2.0).targets) == {"l"}
    assert set(Network(targets, "locon", 2, 2.0).targets) == {"c", "l"}  # LoCon adapts convs by default
    assert set(Network(targets, "lora", 2, 2.0, conv_rank=2).targets) == {"c", "l"}


def test_dora_reads_quantized_and_scaled_base_weights():
    """DoRA's norm needs the base weight; a layer that stores it scaled (ComfyUI's scaled fp8) is read right."""
    from trainer.models.base import Target, TargetMember
    from trainer.networks.base import read_weight

    torch.manual_seed(0)
    plain = nn.Linear(16, 8, bias=False)
    scaled = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(plain.weight / 4)
    scaled.scale_weight = torch.tensor(4.0)
    torch.testing.assert_close(read_weight(scaled), plain.weight.detach())
    norms = []
    for layer in (plain, scaled):
        net = Network([Target("k", 16, 8, [TargetMember(layer, slice(0, 8))])], "dora", 2, 2.0)
        norms.append(net.adapter("k").dora_scale.detach())
    torch.testing.assert_close(norms[0], norms[1])
