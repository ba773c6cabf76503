"""Helpers of benchmarks/device_run.sh: merge the GPU benchmark's JSON files, print their short table.

    python benchmarks/device_summary.py merge OUT.json IN.json...   # {"runs": [...]} of the files that exist
    python benchmarks/device_summary.py table OUT.json              # one line per measurement
"""

from __future__ import annotations

import json
import os
import sys


def merge(out: str, inputs: list[str]) -> None:
    runs = []
    for path in inputs:
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    with open(out, "w") as f:
        json.dump({"runs": runs}, f, indent=1)


def table(path: str) -> None:
    with open(path) as f:
        runs = json.load(f)["runs"]
    print(f"{'workload':12} {'gpus':>4} {'peer':12} {'op':8} {'median s':>9} {'min s':>8} {'GB/s':>7} {'x pinned':>8} {'x raw':>6}  notes")
    for run in runs:
        workload = run["args"]["workload"] + ("+fsync" if run["args"].get("durable") == "on" else "")
        for r in run["results"]:
            notes = "WRONG VALUES" if r.get("verified") is False else ("verified" if r.get("verified") else "")
            xp = f"{r['x_pinned']:.2f}" if r.get("x_pinned") else "-"
            xr = f"{r['x_raw']:.2f}" if r.get("x_raw") else "-"
            print(f"{workload:12} {r['gpus']:4} {r['peer']:12} {r['op']:8} {r['median_s']:9.4f} {r['min_s']:8.4f} "
                  f"{r['gbps']:7.2f} {xp:>8} {xr:>6}  {notes}")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "merge":
        merge(argv[1], argv[2:])
        return 0
    if len(argv) == 2 and argv[0] == "table":
        table(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
