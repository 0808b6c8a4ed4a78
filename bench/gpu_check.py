"""One prepared GPU check: every CUDA path and the GPU figures in one command of at most 8 minutes (`make gpu-check`).

Runs, each part in its own process under its own time limit (so one failure or hang loses only that part), within
one overall budget:
  tests          pytest tests/test_cuda.py (the CUDA paths: fast path, label cache, compile with CUDA graphs, feature
                 cache, fused AdamW, channels_last training, determinism across batch sizes)
  guided_step    the full ADE20K network at 256x256, batch 8, one guided step: fp32, bf16 eager, fast path, fast
                 path with the label cache; ms/step, TFLOP/s, share of the bf16 matmul peak, peak memory
  sampling       images/s per GPU at the default sampler (50 steps) with the label cache; the largest micro-batch
  training       training images/s per precision and memory format at full width, the largest batch that fits
  compiled_step  the fast path with the label cache under torch.compile with CUDA graphs, against it eager
then writes summary.md, summary.json and gpu-check.log (every part's output) into --out and prints the summary;
exits 1 when a part failed, timed out or was not started.
Needs only Python, torch with CUDA, safetensors, pyarrow, pillow, numpy and pytest: no Ray, no boto3, nothing of
jobs/ or serve/. Without CUDA it refuses at once (exit 2).

    make gpu-check OUT=runs/gpu-check
    python bench/gpu_check.py --out runs/gpu-check --parts guided_step,sampling --budget-s 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch

import gpu_parts

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
DEFAULT_BUDGET_S = 470  # the whole check, 8 minutes with the summary and the start of each process
MIN_PART_S = 20  # a part with less of the budget left is skipped, not started
LOG_TAIL_LINES = 40


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    limit_s: int  # its own time limit (the budget left caps it further)
    what: str


PARTS = [  # in the order they run: the CUDA tests and the figures first, the compilation (the slowest) last
    Part("tests", 150, "pytest tests/test_cuda.py"),
    Part("guided_step", 90, "one guided step of the full network per inference path"),
    Part("sampling", 120, "images/s at the default sampler, largest micro-batch"),
    Part("training", 150, "training images/s per precision and memory format, largest batch"),
    Part("compiled_step", 180, "the fast path compiled with CUDA graphs"),
]
PART_NAMES = [p.name for p in PARTS]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for summary.md, summary.json and gpu-check.log (required unless --part)")
    p.add_argument("--parts", default=",".join(PART_NAMES), help=f"comma-separated, of {', '.join(PART_NAMES)}")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole check's time limit, seconds")
    p.add_argument("--part", choices=list(gpu_parts.PARTS), help=argparse.SUPPRESS)  # one part, in this process
    p.add_argument("--rows", help=argparse.SUPPRESS)  # where --part writes its JSON lines
    args = p.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    if unknown := [name for name in args.parts if name not in PART_NAMES]:
        p.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PART_NAMES)}")
    if not args.parts:
        p.error("--parts names no part")
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.part is None and not args.out:
        p.error("--out is required")
    if args.part is not None and not args.rows:
        p.error("--part needs --rows")
    return args


def cuda_refusal() -> str | None:
    """Why this machine cannot run the check, or None when it has a CUDA GPU."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
    return (f"gpu-check needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); nothing was run.")


def part_env() -> dict[str, str]:
    """The parts' environment: the checkout and bench/ importable without installing, unbuffered output, and no
    pytest plugins but pytest's own (the machine's may differ from CI's)."""
    path = [ROOT, BENCH] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def pytest_command(junit_xml: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit_xml}",
            os.path.join(ROOT, "tests", "test_cuda.py")]


def part_command(name: str, rows: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--part", name, "--rows", rows]


def read_rows(path: str) -> dict[str, Any]:
    """A part's JSON lines as {"rows": [...], "info": {...}, "targets": [...]} (a missing file: nothing)."""
    out: dict[str, Any] = {"rows": [], "info": {}, "targets": []}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            (kind, value), = json.loads(line).items()
            if kind == "info":
                out["info"].update(value)
            else:
                out["rows" if kind == "row" else "targets"].append(value)
    return out


def junit_results(path: str) -> dict[str, Any]:
    """pytest's JUnit XML as rows (one per test: outcome and seconds), counts, and the target that all passed."""
    out: dict[str, Any] = {"rows": [], "info": {}, "targets": []}
    if not os.path.exists(path):
        return out
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
        outcome = {"failure": "failed"}.get(outcome, outcome)
        counts[outcome] += 1
        out["rows"].append({"test": case.get("name"), "outcome": outcome, "s": float(case.get("time") or 0)})
    out["info"] = counts
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    ok = counts["passed"] > 0 and counts["failed"] == counts["error"] == counts["skipped"] == 0
    out["targets"].append({"name": "tests/test_cuda.py on this GPU", "value": summary, "goal": "all pass, none skipped",
                           "met": ok})
    return out


def tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_part(name: str, command: list[str], limit_s: float, rows_path: str, log_path: str,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one part's command under its time limit, its output to log_path; its result with the rows it wrote to
    rows_path before it ended, finished or not. Status: ok, failed (an exit status other than 0) or timed out."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: CUDA workers and compile workers it started go too
            proc.wait()
            rc, status = None, "timed out"
    result = {"name": name, "status": status, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
              "limit_s": round(limit_s, 1), **read_rows(rows_path)}
    if status != "ok":
        result["log_tail"] = tail(log_path)
    return result


def skipped(part: Part, why: str) -> dict[str, Any]:
    return {"name": part.name, "status": "skipped", "rc": None, "seconds": 0.0, "limit_s": 0.0, "rows": [], "info": {},
            "targets": [], "log_tail": why}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: the run, the targets, then each part's status, facts and table."""
    lines = [f"# GPU check: {summary['device']}", "",
             f"torch {summary['torch']} (CUDA {summary['cuda']}), started {summary['started']}, "
             f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget.", ""]
    targets = [{"part": p["name"], **t} for p in summary["parts"] for t in p["targets"]]
    if targets:
        lines += ["## Targets", ""] + _table([{"part": t["part"], "target": t["name"], "measured": t["value"],
                                               "goal": t["goal"], "met": t["met"]} for t in targets]) + [""]
    lines += ["## Parts", ""] + _table([{"part": p["name"], "status": p["status"], "s": p["seconds"],
                                         "limit s": p["limit_s"]} for p in summary["parts"]]) + [""]
    for p in summary["parts"]:
        lines += [f"## {p['name']}: {p['status']}", ""]
        if p["info"]:
            lines += ["; ".join(f"{k}: {_cell(v)}" for k, v in p["info"].items()), ""]
        if p["rows"]:
            lines += _table(p["rows"]) + [""]
        if p.get("log_tail"):
            lines += ["Last lines of its output:", "", "```", p["log_tail"].rstrip(), "```", ""]
    return "\n".join(lines)


def write_summary(out: str, summary: dict[str, Any]) -> str:
    """summary.json and summary.md into `out`; returns the Markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "budget_s": args.budget_s, "parts": [],
    }
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "gpu-check.log")
    with tempfile.TemporaryDirectory() as scratch, open(log_path, "w") as log:
        for part in (p for p in PARTS if p.name in args.parts):
            left = args.budget_s - (time.perf_counter() - started)
            if left < MIN_PART_S:
                result = skipped(part, f"not started: {left:.0f} s of the budget left")
            else:
                print(f"[gpu-check] {part.name}: {part.what} (limit {min(part.limit_s, left):.0f} s)", flush=True)
                rows, part_log = os.path.join(scratch, f"{part.name}.jsonl"), os.path.join(scratch, f"{part.name}.log")
                if part.name == "tests":
                    junit = os.path.join(scratch, "junit.xml")
                    result = run_part(part.name, pytest_command(junit), min(part.limit_s, left), rows, part_log, part_env())
                    result.update(junit_results(junit))
                else:
                    result = run_part(part.name, part_command(part.name, rows), min(part.limit_s, left), rows, part_log,
                                      part_env())
                log.write(f"===== {part.name}: {result['status']} after {result['seconds']} s =====\n")
                with open(part_log, errors="replace") as f:
                    log.write(f.read() + "\n")
                print(f"[gpu-check] {part.name}: {result['status']} after {result['seconds']} s", flush=True)
            summary["parts"].append(result)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if (why := cuda_refusal()) is not None:
        print(why, file=sys.stderr)
        return 2
    if args.part is not None:
        gpu_parts.PARTS[args.part](gpu_parts.Recorder(args.rows), torch.device("cuda"), gpu_parts.Sizes())
        return 0
    summary = run_check(args)
    print(write_summary(args.out, summary))
    print(f"[gpu-check] written: {os.path.join(args.out, 'summary.md')}, summary.json, gpu-check.log")
    return 0 if all(p["status"] == "ok" for p in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
