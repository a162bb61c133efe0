#!/bin/bash
# Run bench/flux_step.py configurations one process each, logs tee'd to $OUT/$LOG.
#   bash bench/flux_experiments.sh LOGNAME "TAG|TIMEOUT|ARGS" ...
# Each process is capped with `timeout` so a slow compile cannot eat the whole call.
log="${OUT:-/tmp}/$1"; shift
export PYTHONUNBUFFERED=1
{ date; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv;
  python3 -c "import torch, diffusers; print('# torch', torch.__version__, 'diffusers', diffusers.__version__)"; } 2>&1 | tee -a "$log"
for spec in "$@"; do
  IFS='|' read -r tag tmo args <<< "$spec"
  echo "### [$tag] timeout ${tmo}s: python3 bench/flux_step.py --res 1024 --tag $tag $args" | tee -a "$log"
  t0=$(date +%s)
  timeout "$tmo" python3 bench/flux_step.py --res 1024 --tag "$tag" $args 2>&1 \
    | grep -v "should be kept in float32" | tee -a "$log"
  echo "### [$tag] rc=${PIPESTATUS[0]} wall $(( $(date +%s) - t0 )) s" | tee -a "$log"
done
python3 - "$log" <<'PY' | tee -a "$log"
import json, sys
print("# tag            res  s/step  median   peak_GiB  MFU(247)  HFU(exec)  warmup_s (first = compile)")
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        print(f"# {d['tag']:<14} {d['res']:4d}  {d['s_per_step']:.3f}  {d['s_per_step_median']:.3f}  {d['peak_gib']:8.2f}"
              f"  {d['mfu']:7.1%}  {d['hfu_executed']:8.1%}   {d['warmup_s']}  {d.get('dynamo', '')}")
PY
