"""The live loss chart (web/js/eridiffusion.js) under Node.js: the extension is loaded as ComfyUI's frontend
loads it, fed the events the Train node sends (`eridiffusion.loss`: node, step, total, loss), and asked to
draw. Skipped where no `node` executable is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST = {
    "app.js": "export const app = { extensions: [], graph: { nodes: {}, getNodeById(id) { return this.nodes[id]; } },"
              " registerExtension(e) { this.extensions.push(e); } };\n",
    "api.js": "export const api = new EventTarget();\n",
}


def test_chart_draws_the_train_nodes_losses(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js (`node`) to run the frontend extension")
    (tmp_path / "scripts").mkdir()
    for name, text in HOST.items():
        (tmp_path / "scripts" / name).write_text(text)
    (tmp_path / "x" / "y").mkdir(parents=True)
    shutil.copy(REPO / "web" / "js" / "eridiffusion.js", tmp_path / "x" / "y" / "eridiffusion.js")
    r = subprocess.run([node, str(REPO / "tests" / "js" / "loss_chart_harness.mjs"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] == 0, "drew a chart before any loss arrived"
    assert out["afterRun"]["losses"] == [[1, 0.5], [2, 0.25], [3, 0.125]]  # the other node's event is not here
    assert out["afterRun"]["dirty"] == 3
    names = [c[0] for c in out["drawn"]]
    assert names.count("moveTo") == 1 and names.count("lineTo") == 2 and "stroke" in names
    text = [c[1] for c in out["drawn"] if c[0] == "fillText"]
    assert text == ["step 3/3  loss 0.1250"], text
    # points run left to right and the lowest loss is lowest on the canvas (largest y)
    pts = [c[1:3] for c in out["drawn"] if c[0] in ("moveTo", "lineTo")]
    assert pts[0][0] < pts[1][0] < pts[2][0] and pts[0][1] < pts[1][1] < pts[2][1]
    assert out["restarted"] == [[1, 0.75]]
    assert out["size"][1] > 200 and not out["otherPatched"]
