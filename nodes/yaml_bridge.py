"""YAML jobs <-> node settings: a workflow and a job file describe the same run."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io, ui

from ..trainer.config import parse_yaml_text
from ..trainer.errors import ConfigError
from ..trainer.fileio import write_text_atomic
from ..trainer.session import job_from_parts, parts_from_job
from .types import CATEGORY, EriDatasets, EriModel, EriNetworkT, EriSettings


class EriLoadJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriLoadJob", display_name="Load Training Job (YAML)", category=CATEGORY,
            inputs=[io.String.Input("path", default="")],
            outputs=[EriModel.Output(display_name="training_model"), EriDatasets.Output(display_name="datasets"),
                     EriNetworkT.Output(display_name="network"), EriSettings.Output(display_name="settings"),
                     io.Int.Output(display_name="steps")],
        )

    @classmethod
    def execute(cls, path) -> io.NodeOutput:
        p = Path(path.strip()).expanduser()
        if not p.is_file():
            raise ConfigError(f"{p}: job file not found")
        model, datasets, network, settings, steps = parts_from_job(parse_yaml_text(p.read_text(), str(p)))
        return io.NodeOutput(model, datasets, network, settings, steps)


class EriExportJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriExportJob", display_name="Export Training Job (YAML)", category=CATEGORY,
            is_output_node=True,
            inputs=[EriModel.Input("training_model"), EriDatasets.Input("datasets"), EriNetworkT.Input("network"),
                    EriSettings.Input("settings"), io.Int.Input("steps", default=500, min=1, max=1000000),
                    io.String.Input("path", default="job.yaml")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, training_model, datasets, network, settings, steps, path) -> io.NodeOutput:
        import yaml

        if "comfy" in training_model:
            raise ConfigError("export: a model from ComfyUI's loaders has no file paths to write; use"
                              " 'Training Model (by arch, from files)' to export a job `python -m trainer` runs")
        job = job_from_parts(training_model, datasets, network, settings, steps, "output")
        p = Path(path.strip()).expanduser()
        write_text_atomic(p, yaml.safe_dump(job, sort_keys=False))
        return io.NodeOutput(str(p), ui=ui.PreviewText(f"wrote {p}: python -m trainer {p}"))
