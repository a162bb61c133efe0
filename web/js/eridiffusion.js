// Live loss chart in the "Train LoRA (N steps)" node, fed by the trainer's per-step events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_H = 90;

function drawChart(node, ctx) {
  const pts = node.eriLosses;
  if (!pts || pts.length < 2) return;
  const w = node.size[0] - 20;
  const top = node.size[1] - CHART_H - 8;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(10, top, w, CHART_H);
  const losses = pts.map((p) => p[1]).filter(Number.isFinite);
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const span = hi - lo || 1;
  const s0 = pts[0][0], s1 = pts[pts.length - 1][0] || 1;
  ctx.strokeStyle = "#6cf";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach(([step, loss], i) => {
    const x = 10 + ((step - s0) / Math.max(1, s1 - s0)) * w;
    const y = top + CHART_H - ((loss - lo) / span) * (CHART_H - 14) - 4;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  const last = pts[pts.length - 1];
  ctx.fillStyle = "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(`step ${last[0]}${node.eriTotal ? "/" + node.eriTotal : ""}  loss ${last[1].toFixed(4)}`, 14, top + 12);
  ctx.restore();
}

app.registerExtension({
  name: "eridiffusion.losschart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "EriTrain") return;
    const onDraw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDraw?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      drawChart(this, ctx);
    };
    const onResize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = onResize ? onResize.apply(this, arguments) : [320, 200];
      size[1] += CHART_H + 12;
      return size;
    };
  },
  setup() {
    api.addEventListener("eridiffusion.loss", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (!node) return;
      node.eriLosses = node.eriLosses || [];
      if (node.eriLosses.length && detail.step <= node.eriLosses[node.eriLosses.length - 1][0]) {
        node.eriLosses = []; // a new run in this node
      }
      node.eriLosses.push([detail.step, detail.loss]);
      if (node.eriLosses.length > 2000) node.eriLosses.splice(0, node.eriLosses.length - 2000);
      node.eriTotal = detail.total;
      node.setDirtyCanvas(true, true);
    });
  },
});
