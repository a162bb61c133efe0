"""The seam and the prepare step: a model a host hands over is prepared exactly as one the CLI loads; the
session extends a run through the Trainer; the nodes' widgets are the YAML's keys; imports flow one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import job_dict, quiet
from trainer.config import load_job_dict
from trainer.job import build_trainer, load_model, pick_device, pick_dtype
from trainer.models.base import TrainingModel
from trainer.models.flux import FluxModel
from trainer.models.quantize import FP8
from trainer.session import TrainingSession

ROOT = Path(__file__).resolve().parent.parent


def _job(tiny_flux, images, out, **train) -> dict:
    d = job_dict(tiny_flux, images, out, **train)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    return d


class PlacementLog:
    """Records where the prepare step puts a model's text encoders (a FluxModel's own method, recorded)."""

    def __init__(self, model: FluxModel) -> None:
        self.moves: list[str] = []
        place = model.place_text_encoders

        def recorded(device):
            self.moves.append(torch.device(device).type)
            place(device)

        model.place_text_encoders = recorded


def _host_model(job) -> FluxModel:
    """A model loaded the way a host holds one (its own loader, nothing prepared), as the nodes pass it."""
    device = pick_device(job.process.device)
    return load_model(job, device, pick_dtype(job.process.train.dtype, device))


def test_host_model_is_prepared_like_a_loaded_one(tiny_flux, images, tmp_path):
    """Defect 1: checkpointing and quantization were applied only to models the CLI loaded; defect 2: a session
    kept the text encoders on the training device. Through the session's own path (a model handed over, as the
    Train node does) both are applied, and the encoders end up parked off the card, still loaded."""
    d = _job(tiny_flux, images, tmp_path / "cli", gradient_checkpointing=True, cache_text_embeddings=True)
    d["config"]["process"][0]["model"]["quantize"] = True
    cli = build_trainer(load_job_dict(d), report=quiet)

    d["config"]["process"][0]["training_folder"] = str(tmp_path / "host")
    host = _host_model(load_job_dict(d))
    log = PlacementLog(host)
    assert not host.checkpointed_blocks()
    session = TrainingSession(d, model=host, report=quiet)
    model = session.trainer.model
    assert model is host
    for m in (cli.model, model):
        blocks = m.repeated_blocks()
        assert m.checkpointed_blocks() == blocks and m.denoiser.gradient_checkpointing
        assert all(lin.weight.dtype == FP8 for b in blocks for lin in b.modules() if isinstance(lin, torch.nn.Linear))
    assert log.moves == ["cpu", "cpu"]  # onto the (CPU) device for encoding, then parked on the CPU
    assert model.text_encoders_loaded() and not cli.model.text_encoders_loaded()  # the CLI run released them
    session.advance(1)
    img = session.sample("sks a cat", 32, 32, 2, 3.5, seed=1)
    assert img.shape == (3, 32, 32) and log.moves[-2:] == ["cpu", "cpu"]  # on for the prompt, off again


def test_gradient_checkpointing_off_is_off_on_both_paths(tiny_flux, images, tmp_path):
    d = _job(tiny_flux, images, tmp_path / "a", gradient_checkpointing=False)
    assert not build_trainer(load_job_dict(d), report=quiet).model.checkpointed_blocks()
    session = TrainingSession(d | {}, model=_host_model(load_job_dict(d)), report=quiet)
    assert not session.trainer.model.checkpointed_blocks()
    d2 = _job(tiny_flux, images, tmp_path / "b", gradient_checkpointing=0.5)
    blocks = build_trainer(load_job_dict(d2), report=quiet).model.checkpointed_blocks()
    assert len(blocks) == 1  # half of Flux's two blocks


def test_session_extends_the_run_through_the_trainer(tiny_flux, images, tmp_path):
    """Defect 7: the session rewrote the Trainer's steps and scheduler itself, the saved job kept the old step count,
    and one-off samples skipped the trigger word. The lr after extending continues the schedule."""
    d = _job(tiny_flux, images, tmp_path, steps=2, lr_scheduler="linear", lr=1e-3)
    s = TrainingSession(d, report=quiet)
    s.advance(2)
    s.advance(2)
    assert s.step == 4 and s.trainer.cfg.train.steps == 4
    tensors, md = s.export("fp32")
    assert md["eridiffusion.step"] == "4" and "steps: 4" in md["eridiffusion.job"]
    # a linear schedule stretched to 4 steps from step 2: lr(step 4) = 0 at the end, lr(3) = 1e-3 * (1 - 3/4)
    lrs = [g["lr"] for g in s.trainer.optimizer.param_groups]
    assert lrs == [pytest.approx(0.0, abs=1e-12)]
    from trainer.train.optim import lr_factor

    assert lr_factor("linear", 3, 4, 0) == pytest.approx(0.25)
    (prepared,) = __import__("trainer.previews", fromlist=["prepare_samples"]).prepare_samples(
        s.job, s.trainer.model, [__import__("trainer.config", fromlist=["SampleItem"]).SampleItem(
            prompt="[trigger] a dog", width=32, height=32, seed=1, neg="", guidance_scale=1.0)])
    assert prepared.prompt == "sks a dog"


def test_keys_that_do_nothing_are_warned_by_name(tiny_flux, images, tmp_path):
    """Defect 6: accepted keys that were silently dropped."""
    d = _job(tiny_flux, images, tmp_path, noise_scheduler="flowmatch")
    p = d["config"]["process"][0]
    p["model"]["low_vram"] = True
    p["sample"]["sampler"] = "flowmatch"
    p["logging"] = {"use_wandb": False}
    p["performance_log_every"] = 10
    warnings = load_job_dict(d).warnings
    for key in ("train.noise_scheduler", "model.low_vram", "sample.sampler", "process[0].logging",
                "process[0].performance_log_every"):
        assert any(key in w and "ignored (" in w for w in warnings), (key, warnings)


def test_node_widget_defaults_are_the_yaml_defaults(tiny_flux, images, tmp_path):
    """Defect 5: node and YAML defaults differed (timestep_type, cache_text_embeddings, caption_dropout_rate). Every
    widget at its default gives a job equal to one that leaves those keys out."""
    from trainer import graph_parts as gp
    from trainer.session import job_from_parts

    widgets = (gp.DATASET_WIDGETS + gp.DATASET_OPTIONAL_WIDGETS + gp.NETWORK_WIDGETS + gp.SETTINGS_WIDGETS
               + gp.SETTINGS_OPTIONAL_WIDGETS
               + gp.MODEL_WIDGETS + gp.MODEL_OPTIONAL_WIDGETS)
    defaults = {w.name: w.default for w in widgets}
    dataset = gp.dataset_section({**defaults, "folder_path": str(images)})
    model = gp.model_section("flux", {**defaults, "name_or_path": tiny_flux["name_or_path"]})
    job = job_from_parts({"model": model}, [dataset], gp.network_section(defaults),
                         gp.settings_section({**defaults, "name": "run"}), 1000, str(tmp_path))
    from_nodes = load_job_dict(job).process
    plain = load_job_dict({"config": {"name": "run", "process": [{
        "datasets": [{"folder_path": str(images)}], "model": {"arch": "flux", "name_or_path": tiny_flux["name_or_path"]},
        "training_folder": str(tmp_path)}]}}).process
    assert from_nodes == plain
    ts = next(w for w in gp.SETTINGS_WIDGETS if w.name == "timestep_type")
    assert ts.options()[0] == gp.FAMILY_DEFAULT and ts.default == gp.FAMILY_DEFAULT
    assert gp.section_of([ts], {"timestep_type": "sigmoid"}) == {"train": {"timestep_type": "sigmoid"}}
    # every widget's tooltip comes from the key's help (none left blank on the settings node)
    assert all(w.tooltip_text() for w in gp.SETTINGS_WIDGETS)


@pytest.mark.parametrize("bad", ["../../../x", "/etc/passwd", "a\0b", "", "..", "sub/../../x"])
def test_save_names_stay_inside_the_loras_folder(tmp_path, bad):
    """Defect 4 (and the reliability issue's row 1): names and subfolders that would leave models/loras."""
    from trainer.errors import ConfigError
    from trainer.paths import contained_file

    root = tmp_path / "loras"
    root.mkdir()
    with pytest.raises(ConfigError, match="Save LoRA"):
        contained_file(root, "eridiffusion", bad, (".safetensors",), "Save LoRA")
    with pytest.raises(ConfigError, match="Save LoRA"):
        contained_file(root, bad if bad else "../loras_evil", "ok", (".safetensors",), "Save LoRA") if bad not in (
            "", "..") else contained_file(root, "../loras_evil", "ok", (".safetensors",), "Save LoRA")


def test_save_names_refuse_links_out_and_accept_subfolders(tmp_path):
    from trainer.errors import ConfigError
    from trainer.paths import contained_file

    root, outside = tmp_path / "loras", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match="through a link"):
        contained_file(root, "link", "x", (".safetensors",), "Save LoRA")
    ok = contained_file(root, "styles/2026", "my_lora", (".safetensors",), "Save LoRA")
    assert ok == (root / "styles" / "2026" / "my_lora.safetensors").resolve()


# --- imports ------------------------------------------------------------------------------------------

def _modules() -> list[str]:
    out = []
    for p in sorted((ROOT / "trainer").rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            out.append(".".join(parts))
    return out


ISOLATED_IMPORTS = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]:
        del sys.modules[loaded]  # each module imports from nothing of trainer already loaded
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_on_its_own():
    r = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *_modules()], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _is_module(name: str) -> bool:
    p = ROOT / name.replace(".", "/")
    return name.startswith("trainer") and (p.with_suffix(".py").exists() or (p / "__init__.py").exists())


def _imports_of(module: str) -> set[str]:
    """trainer modules `module` imports anywhere in its body (top level or inside functions)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]:
        block.body = []  # imports for annotations only: not a dependency at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import tiny` depends on the module tiny; `from .x import f` on x
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            out.update(subs if subs else [target] if _is_module(target) else [])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("trainer."))
    out.discard(module)
    return {m for m in out if m.startswith("trainer")}


def test_imports_flow_one_way():
    """No cycles between trainer's modules, counting imports inside functions (which used to dodge them)."""
    graph = {m: _imports_of(m) for m in _modules()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n in graph and state.get(n) is None:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


def test_no_family_reads_by_name_outside_families():
    """Nothing outside a family module reads model members through getattr / hasattr."""
    seam_users = ["trainer/job.py", "trainer/prepare.py", "trainer/session.py", "trainer/sampling.py",
                  "trainer/previews.py", "trainer/train/loop.py", "trainer/data/cache.py", "nodes/train.py"]
    for f in seam_users:
        text = (ROOT / f).read_text()
        assert "hasattr(" not in text and "getattr(model" not in text and "getattr(self.model" not in text, f
    assert set(TrainingModel.__abstractmethods__) == {"targets", "latent_channels", "encode_text", "predict",
                                                      "sample_sigmas"}


def test_ragged_conditioning_keeps_each_captions_own_shape():
    """ComfyUI encodes each caption at its own length: a batch holds them zero-padded with their true shapes, a
    sample comes back exactly, and the text cache's per-caption items collate (padded) across batches of other
    lengths; a varying tensor without its shape record is refused."""
    from trainer.models.base import collate_conditioning, ragged_batch, sample_of, split_conditioning

    a = {"cross_attn": torch.randn(5, 8), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    b = {"cross_attn": torch.randn(9, 8), "attention_mask": torch.ones(1, 9, dtype=torch.long)}
    c = {"cross_attn": torch.randn(3, 8), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    batch = ragged_batch([a, b])
    assert batch["cross_attn"].shape == (2, 9, 8) and batch["attention_mask"].shape == (2, 1, 9)
    for i, want in enumerate((a, b)):
        got = sample_of(batch, i)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    items = split_conditioning(batch) + split_conditioning(ragged_batch([c]))
    again = collate_conditioning([items[2], items[0]])
    assert again["cross_attn"].shape == (2, 9, 8)
    assert torch.equal(sample_of(again, 0)["cross_attn"], c["cross_attn"]) and torch.equal(
        sample_of(again, 1)["cross_attn"], a["cross_attn"])
    with pytest.raises(RuntimeError, match="varies in shape"):
        collate_conditioning([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
