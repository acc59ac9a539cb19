"""Table of the task-adaptive pretraining comparison (issue 12 §4b) from the finished runs.

    .venv/bin/python benchmarks/tapt_table.py [--runs runs/tapt_ft] [--logs logs_tapt]

One row per (init, label fraction): test UAR / WA mean ± std over the seeds that finished (sample
std, n - 1: `uniter3m.evaluation.report.mean_std`), the seeds, the per-seed test UAR, and the CPU
time per run (user + sys, from the /usr/bin/time line that benchmarks/tapt_finetune.sh writes).
Only runs with a test score count.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from uniter3m.evaluation.report import format_mean_std

RUN = re.compile(r"^(?P<init>\w+?)_f(?P<frac>[0-9.]+)_s(?P<seed>\d+)$")
TIME = re.compile(r"cpu_user_s ([0-9.]+) cpu_sys_s ([0-9.]+) wall_s ([0-9.]+)")


def collect(runs: Path, logs: Path) -> dict[tuple[str, str], list[dict]]:
    table: dict[tuple[str, str], list[dict]] = {}
    for run in sorted(runs.iterdir()):
        m = RUN.match(run.name)
        metrics = sorted(run.glob("fold*/metrics.json"))
        if not m or not metrics:
            continue
        d = json.loads(metrics[0].read_text())
        t = (
            TIME.search((logs / f"{run.name}.log").read_text())
            if (logs / f"{run.name}.log").is_file()
            else None
        )
        table.setdefault((m["init"], m["frac"]), []).append(
            {
                "seed": int(m["seed"]),
                "uar": d["test"]["uar"],
                "wa": d["test"]["wa"],
                "valid": d["best_valid"],
                "train": d["sizes"]["train"],
                "steps": d["steps"],
                "cpu_min": (float(t[1]) + float(t[2])) / 60 if t else None,
                "wall_min": float(t[3]) / 60 if t else None,
            }
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs/tapt_ft"))
    parser.add_argument("--logs", type=Path, default=Path("logs_tapt"))
    args = parser.parse_args()
    table = collect(args.runs, args.logs)
    print(
        "| init | labels (train utterances) | test UAR | test WA | n seeds | per seed UAR | valid UAR | steps | CPU min/run (wall) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (init, frac), rows in sorted(table.items(), key=lambda kv: (float(kv[0][1]), kv[0][0])):
        rows.sort(key=lambda r: r["seed"])
        cpu = [r["cpu_min"] for r in rows if r["cpu_min"] is not None]
        wall = [r["wall_min"] for r in rows if r["wall_min"] is not None]
        seeds = ", ".join(str(r["seed"]) for r in rows)
        per_seed = " / ".join(f"{r['uar']:.2f}" for r in rows)
        steps = " / ".join(str(r["steps"]) for r in rows)
        times = f"{statistics.mean(cpu):.1f} ({statistics.mean(wall):.1f})" if cpu else "n/a"
        cells = [
            init,
            f"{float(frac) * 100:g} % ({rows[0]['train']})",
            format_mean_std([r["uar"] for r in rows]),
            format_mean_std([r["wa"] for r in rows]),
            f"{len(rows)} (seeds {seeds})",
            per_seed,
            format_mean_std([r["valid"] for r in rows]),
            steps,
            times,
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
