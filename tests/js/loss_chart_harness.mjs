// Runs web/js/eridiffusion.js as ComfyUI's frontend would load it, against a minimal host: `app` records the
// extension, `api` is an EventTarget that delivers "eridiffusion.loss" events as the server sends them.
// Prints one JSON line with what the Train node's chart drew. Usage: node loss_chart_harness.mjs <root>,
// where <root>/x/y/eridiffusion.js is the extension and <root>/scripts/{app,api}.js are written by the test.
const root = process.argv[2];
const { app } = await import(`${root}/scripts/app.js`);
const { api } = await import(`${root}/scripts/api.js`);
await import(`${root}/x/y/eridiffusion.js`);

const ext = app.extensions[0];
const nodeType = { prototype: {} };
await ext.beforeRegisterNodeDef(nodeType, { name: "EriTrain" });
const other = { prototype: {} };
await ext.beforeRegisterNodeDef(other, { name: "KSampler" });
ext.setup();

const node = Object.create(nodeType.prototype);
Object.assign(node, { id: 7, size: [400, 300], flags: {}, dirty: 0, setDirtyCanvas() { this.dirty++; } });
app.graph.nodes[7] = node;

const send = (detail) => api.dispatchEvent(Object.assign(new Event("eridiffusion.loss"), { detail }));
const calls = [];
const ctx = new Proxy({}, {
  get: (t, k) => (k in t ? t[k] : (...a) => calls.push([k, ...a])),
  set: (t, k, v) => { t[k] = v; return true; },
});
node.onDrawForeground(ctx);
const before = calls.length;
send({ node: "7", step: 1, total: 3, loss: 0.5 });
send({ node: "7", step: 2, total: 3, loss: 0.25 });
send({ node: "99", step: 1, total: 3, loss: 9.0 });  // another node's run: not drawn here
send({ node: "7", step: 3, total: 3, loss: 0.125 });
node.onDrawForeground(ctx);
const drawn = calls.slice(before);
const afterRun = { losses: node.eriLosses, dirty: node.dirty };
send({ node: "7", step: 1, total: 2, loss: 0.75 });  // a new run in the same node starts a new chart
console.log(JSON.stringify({
  before, drawn, afterRun, restarted: node.eriLosses,
  size: node.computeSize(), otherPatched: "onDrawForeground" in other.prototype,
}));
