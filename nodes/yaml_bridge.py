"""YAML jobs <-> node settings: a workflow and a job file describe the same run.

Export writes only `.yaml` files inside ComfyUI's output folder (a path relative to it), and overwrites only
job files it wrote itself; Load reads `.yaml` / `.yml` files only."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io, ui

from ..trainer.config import parse_yaml_text, resolve_job_paths
from ..trainer.errors import ConfigError
from ..trainer.fileio import write_text_atomic
from ..trainer.paths import contained
from ..trainer.session import job_from_parts, parts_from_job
from .types import CATEGORY, EriDatasets, EriModel, EriNetworkT, EriSettings

EXPORT_MARK = "# written by EriDiffusion's Export Training Job node"


class EriLoadJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriLoadJob", display_name="Load Training Job (YAML)", category=CATEGORY,
            inputs=[io.String.Input("path", default="", tooltip="a .yaml job file (absolute, or in ComfyUI's output)")],
            outputs=[EriModel.Output(display_name="training_model"), EriDatasets.Output(display_name="datasets"),
                     EriNetworkT.Output(display_name="network"), EriSettings.Output(display_name="settings"),
                     io.Int.Output(display_name="steps")],
        )

    @classmethod
    def execute(cls, path) -> io.NodeOutput:
        import folder_paths

        raw = path.strip()
        if "\0" in raw:
            raise ConfigError("Load Training Job path: holds a NUL character")
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = Path(folder_paths.get_output_directory()) / p
        if p.suffix.lower() not in (".yaml", ".yml"):
            raise ConfigError(f"Load Training Job path: {str(p)!r} is not a .yaml / .yml job file")
        if not p.is_file():
            raise ConfigError(f"{p}: job file not found")
        data = parse_yaml_text(p.read_text(encoding="utf-8-sig"), str(p))
        model, datasets, network, settings, steps = parts_from_job(data, Path(os.path.abspath(p)).parent)
        return io.NodeOutput(model, datasets, network, settings, steps)


class EriExportJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriExportJob", display_name="Export Training Job (YAML)", category=CATEGORY,
            is_output_node=True,
            inputs=[EriModel.Input("training_model"), EriDatasets.Input("datasets"), EriNetworkT.Input("network"),
                    EriSettings.Input("settings"), io.Int.Input("steps", default=500, min=1, max=1000000),
                    io.String.Input("path", default="eridiffusion/job.yaml",
                                    tooltip="a .yaml file inside ComfyUI's output folder")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, training_model, datasets, network, settings, steps, path) -> io.NodeOutput:
        import folder_paths
        import yaml

        if "comfy" in training_model:
            raise ConfigError("export: a model from ComfyUI's loaders has no file paths to write; use"
                              " 'Training Model (by arch, from files)' to export a job `python -m trainer` runs")
        p = export_path(folder_paths.get_output_directory(), path)
        job = job_from_parts(training_model, datasets, network, settings, steps, "output")
        # the graph's relative paths are ComfyUI's working folder's: written absolute, the job runs from anywhere
        resolve_job_paths(job["config"]["process"][0], Path.cwd().resolve(), [])
        write_text_atomic(p, f"{EXPORT_MARK}\n" + yaml.safe_dump(job, sort_keys=False))
        return io.NodeOutput(str(p), ui=ui.PreviewText(f"wrote {p}: python -m trainer {p}"))


def export_path(root: str, relative: str) -> Path:
    """Where Export may write: a .yaml inside `root`, new or a job this node wrote before."""
    p = contained(root, relative, "Export Training Job path")
    if p.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"Export Training Job path: {relative!r} must end in .yaml")
    if p.exists():
        head = p.read_text(encoding="utf-8", errors="replace").splitlines()[:1] if p.is_file() else []
        if head != [EXPORT_MARK]:
            raise ConfigError(f"Export Training Job path: {p} exists and is not a job this node wrote; not overwritten")
    return p
