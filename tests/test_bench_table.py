"""The speed table's rows (bench/speed_table.py) name benches, variants and options that exist: a row that does not
parse fails only on the device, after minutes of a lease."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import e2e_run  # noqa: E402
import speed_table  # noqa: E402


@pytest.mark.parametrize("row", sorted(speed_table.ROWS))
def test_row_parses_with_its_bench(row):
    _, cmd = speed_table.ROWS[row]
    script, args = cmd[0], [a.replace("{work}", "/tmp/w") for a in cmd[1:]]
    assert (BENCH / script).is_file(), f"{row}: no bench/{script}"
    if not script.endswith("_e2e.py"):
        return  # the step benches parse their own options
    variants = importlib.import_module(script[:-3]).VARIANTS
    ap = argparse.ArgumentParser(exit_on_error=False)
    e2e_run.add_args(ap, "/tmp", variants)
    parsed = ap.parse_args(args)
    assert set(parsed.variants) <= set(variants)
