#!/bin/bash
# Issue 13's levers 1 and 2 on the card, in one call: the attention self-test at several families' shapes, then
# Flux 1024² through `python -m trainer` (compile): a first run on an empty compile cache, the same run again on
# the filled cache, then cuDNN attention as the self-test chooses it and forced on. Log tee'd to $OUT/$1.
#   bash bench/speed_levers.sh speed_levers_h200.log [steps]
log="${OUT:-/tmp}/${1:-speed_levers.log}"; steps="${2:-20}"
work=/tmp/levers; cache=$work/cache
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu,power.draw --format=csv;
  python3 -c "import torch, diffusers; print('# torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__)"; } 2>&1 | tee -a "$log"
cd bench || exit 1
timeout 60 python3 pcie_bw.py 2>&1 | tee -a "$log"
echo "### attention self-test, several families" | tee -a "$log"
timeout 120 python3 attention_probe.py 2>&1 | tee -a "$log"
rm -rf "$cache"
echo "### writing the random full-size Flux files" | tee -a "$log"
timeout 200 python3 -c "from pathlib import Path; from flux_e2e import build_files; build_files(Path('$work'))" 2>&1 | tee -a "$log"
for v in compile_cudnn_off compile_cudnn_off compile compile_cudnn_on; do
  echo "### flux_e2e 1024 $v (cache $cache)" | tee -a "$log"
  t0=$(date +%s)
  timeout 240 python3 flux_e2e.py --work $work --res 1024 --steps "$steps" --warmup 6 --variants $v --cache "$cache" 2>&1 \
    | grep -v "should be kept in float32" | tee -a "$log"
  echo "### rc=${PIPESTATUS[0]} wall $(( $(date +%s) - t0 )) s" | tee -a "$log"
done
cp "$cache/attention_selftest.json" "${OUT:-/tmp}/attention_selftest_flux.json" 2>/dev/null
du -sh "$cache/inductor" 2>&1 | tee -a "$log"
