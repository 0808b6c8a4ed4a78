"""The GPU check's CPU side (bench/gpu_check.py, bench/gpu_parts.py): its arguments, the part runner's time limits,
the summary it writes, its refusal without CUDA, its imports on a machine without Ray or boto3, and its measuring
parts run on the CPU at the tiny preset's sizes (the compiled part aside: compiling takes minutes on a CPU)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import gpu_check  # noqa: E402
import gpu_parts  # noqa: E402

CPU = torch.device("cpu")
TINY = gpu_parts.Sizes(preset="tiny", batch=2, repeats=1, max_micro_batch=4, train_batches=(1, 2), train_steps=3,
                       train_warmup=1, train_precisions=("fp32", "bf16"))
# what the GPU machine lacks (the issue), and what the check must not import
ABSENT = ("ray", "boto3", "botocore", "lpips", "pytorch_fid", "jobs", "serve")


def test_arguments_select_parts_in_their_order_and_refuse_unknown_ones(capsys):
    args = gpu_check.parse_args(["--out", "o"])
    assert args.parts == gpu_check.PART_NAMES and args.budget_s == gpu_check.DEFAULT_BUDGET_S
    assert gpu_check.parse_args(["--out", "o", "--parts", "training, guided_step"]).parts == ["training", "guided_step"]
    for argv, message in ((["--out", "o", "--parts", "guided_step,fid"], "unknown part(s) fid"),
                          (["--out", "o", "--budget-s", "0"], "--budget-s must be positive"),
                          ([], "--out is required"),
                          (["--part", "sampling"], "--part needs --rows")):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    # the limits fit the 8 minutes with the default budget, and every measuring part is run
    assert gpu_check.DEFAULT_BUDGET_S <= 480
    assert set(gpu_check.PART_NAMES) == {"tests", *gpu_parts.PARTS}


def _fake_summary() -> dict:
    ok = {"name": "guided_step", "status": "ok", "rc": 0, "seconds": 41.5, "limit_s": 90.0,
          "rows": [{"row": "fp32 eager", "ms/step": 439.21, "% bf16 peak": 17.4, "peak GiB": 12.5},
                   {"row": "bf16 fast path", "ms/step": 120.04, "% bf16 peak": 55.25, "peak GiB": None}],
          "info": {"device": "NVIDIA H200", "params_M": 660.6},
          "targets": [{"name": "guided step share", "value": "55.2%", "goal": ">= 50%", "met": True}]}
    failed = {"name": "tests", "status": "failed", "rc": 1, "seconds": 12.0, "limit_s": 150.0,
              "rows": [{"test": "test_fused_adamw", "outcome": "failed", "s": 0.5}], "info": {"passed": 9, "failed": 1},
              "targets": [{"name": "tests/test_cuda.py on this GPU", "value": "9 passed, 1 failed",
                           "goal": "all pass, none skipped", "met": False}],
              "log_tail": "E   AssertionError: fused AdamW was not used\n"}
    timed_out = {"name": "sampling", "status": "timed out", "rc": None, "seconds": 120.0, "limit_s": 120.0,
                 "rows": [{"row": "micro-batch 8", "images/s": 1.234}], "info": {}, "targets": [],
                 "log_tail": "measuring micro-batch 64\n"}
    return {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "started": "2026-12-03 20:00 UTC",
            "budget_s": 470, "seconds": 181.2, "parts": [ok, failed, timed_out, gpu_check.skipped(
                gpu_check.PARTS[-1], "not started: 12 s of the budget left")]}


def test_the_summary_is_json_and_markdown_with_every_part_its_status_targets_and_failures(tmp_path):
    summary = _fake_summary()
    text = gpu_check.write_summary(str(tmp_path / "out"), summary)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert (tmp_path / "out" / "summary.md").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "# GPU check: NVIDIA H200"
    assert "| guided_step | guided step share | 55.2% | >= 50% | yes |" in lines
    assert "| tests | tests/test_cuda.py on this GPU | 9 passed, 1 failed | all pass, none skipped | no |" in lines
    for status in ("guided_step: ok", "tests: failed", "sampling: timed out", "compiled_step: skipped"):
        assert f"## {status}" in lines
    # a row table per part, numbers rounded for reading, a missing value as '-'
    assert "| row | ms/step | % bf16 peak | peak GiB |" in lines
    assert "| fp32 eager | 439.2 | 17.40 | 12.50 |" in lines and "| bf16 fast path | 120.0 | 55.25 | - |" in lines
    assert "| micro-batch 8 | 1.23 |" in lines  # the rows a timed-out part finished are kept
    assert "device: NVIDIA H200; params_M: 660.6" in lines
    # what failed says why, in the last lines of its output
    assert text.count("Last lines of its output:") == 3
    assert "E   AssertionError: fused AdamW was not used" in lines and "not started: 12 s of the budget left" in lines


def test_a_part_that_runs_past_its_limit_is_stopped_and_keeps_its_rows_and_a_failed_one_shows_its_output(tmp_path):
    rows = str(tmp_path / "rows.jsonl")
    writes_then_hangs = textwrap.dedent(f"""
        import json, time
        with open({rows!r}, "a") as f:
            f.write(json.dumps({{"row": {{"row": "first", "ms/step": 1.5}}}}) + "\\n")
            f.write(json.dumps({{"info": {{"device": "fake"}}}}) + "\\n")
        print("measuring the second row", flush=True)
        time.sleep(60)
    """)
    result = gpu_check.run_part("slow", [sys.executable, "-c", writes_then_hangs], 3, rows, str(tmp_path / "slow.log"))
    assert result["status"] == "timed out" and result["rc"] is None and 3 <= result["seconds"] < 20
    assert result["rows"] == [{"row": "first", "ms/step": 1.5}] and result["info"] == {"device": "fake"}
    assert "measuring the second row" in result["log_tail"]

    fails = "import sys; print('CUDA error: an illegal memory access'); sys.exit(3)"
    result = gpu_check.run_part("bad", [sys.executable, "-c", fails], 30, str(tmp_path / "none.jsonl"),
                                str(tmp_path / "bad.log"))
    assert result["status"] == "failed" and result["rc"] == 3 and result["rows"] == []
    assert "CUDA error: an illegal memory access" in result["log_tail"]

    ok = gpu_check.run_part("ok", [sys.executable, "-c", "print('fine')"], 30, rows, str(tmp_path / "ok.log"))
    assert ok["status"] == "ok" and ok["rc"] == 0 and "log_tail" not in ok


def test_pytests_junit_report_becomes_rows_counts_and_a_target_that_skips_do_not_meet(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_cuda" name="test_a" time="1.25"/>
        <testcase classname="tests.test_cuda" name="test_b" time="0.5"><failure message="boom">x</failure></testcase>
        <testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="needs a CUDA GPU"/></testcase>
        </testsuite></testsuites>""")
    result = gpu_check.junit_results(str(xml))
    assert result["rows"] == [{"test": "test_a", "outcome": "passed", "s": 1.25},
                              {"test": "test_b", "outcome": "failed", "s": 0.5},
                              {"test": "test_c", "outcome": "skipped", "s": 0.0}]
    assert result["info"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert result["targets"][0]["value"] == "1 passed, 1 failed, 1 skipped" and not result["targets"][0]["met"]
    assert gpu_check.junit_results(str(tmp_path / "absent.xml"))["rows"] == []  # a timed-out pytest writes none


def _without(tmp_path, absent: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Python cannot import `absent` (a meta-path blocker in sitecustomize), nor see a GPU."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {set(absent)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
                return None

        sys.meta_path.insert(0, Absent())
    """))
    root = os.path.dirname(gpu_check.BENCH)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), root]), "CUDA_VISIBLE_DEVICES": "",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def test_without_cuda_it_refuses_at_once_and_all_it_imports_imports_without_ray_or_boto3(tmp_path):
    env = _without(tmp_path, ABSENT)
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert blocked.returncode == 1 and "absent on the GPU machine" in blocked.stderr  # the blocker works

    out = tmp_path / "out"
    script = os.path.join(gpu_check.BENCH, "gpu_check.py")
    refused = subprocess.run([sys.executable, script, "--out", str(out)], env=env, capture_output=True, text=True,
                             timeout=120)
    # it got past every import (gpu_parts, the benches it reuses, sdm) and stopped at the CUDA check
    assert refused.returncode == 2, refused.stderr
    assert "gpu-check needs a CUDA GPU" in refused.stderr and "nothing was run" in refused.stderr
    assert not out.exists()

    # the tests part's own command collects tests/test_cuda.py (and its conftest) there
    collect = subprocess.run(gpu_check.pytest_command(str(tmp_path / "junit.xml")) + ["--collect-only", "-q"], env=env,
                             cwd=os.path.dirname(gpu_check.BENCH), capture_output=True, text=True, timeout=180)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    assert "tests collected" in collect.stdout and "error" not in collect.stdout.lower()


def test_the_largest_fitting_size_stops_at_the_first_that_does_not_fit():
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= 16 or n == 64  # 64 "fitting" again must not be reached: the search stops at 32

    assert gpu_parts.largest_fitting([8, 16, 32, 64], fits) == 16 and tried == [8, 16, 32]
    assert gpu_parts.largest_fitting([8, 16], lambda n: False) is None


def test_running_out_of_device_memory_is_not_fitting_and_other_errors_stay_errors():
    def oom() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def broken() -> None:
        raise RuntimeError("cuDNN error")

    assert gpu_parts.fits_in_memory(lambda: None) and not gpu_parts.fits_in_memory(oom)
    with pytest.raises(RuntimeError, match="cuDNN"):
        gpu_parts.fits_in_memory(broken)


def _part(name: str, tmp_path) -> dict:
    path = str(tmp_path / f"{name}.jsonl")
    gpu_parts.PARTS[name](gpu_parts.Recorder(path), CPU, TINY)
    return gpu_check.read_rows(path)


def test_the_guided_step_part_measures_every_inference_path_and_the_label_cache_does_less_work(tmp_path, one_thread):
    got = _part("guided_step", tmp_path)
    rows = {r["row"]: r for r in got["rows"]}
    assert list(rows) == ["fp32 eager", "bf16 eager", "bf16 fast path", "bf16 fast path + label cache"]
    assert rows["fp32 eager"]["TFLOP/step"] == rows["bf16 eager"]["TFLOP/step"] == rows["bf16 fast path"]["TFLOP/step"]
    assert rows["bf16 fast path + label cache"]["TFLOP/step"] < 0.7 * rows["bf16 fast path"]["TFLOP/step"]
    peak = got["info"]["bf16 matmul peak TFLOP/s"]
    for r in rows.values():
        assert r["ms/step"] > 0 and r["peak GiB"] is None  # no device memory on the CPU
        assert math.isclose(r["TFLOP/s"], r["TFLOP/step"] / (r["ms/step"] / 1e3), rel_tol=1e-9)
        assert math.isclose(r["% bf16 peak"], 100 * r["TFLOP/s"] / peak, rel_tol=0.1)  # the peak is rounded in info
    assert got["info"]["preset"] == "tiny" and got["info"]["params_M"] > 0
    assert [t["goal"] for t in got["targets"]] == [">= 50%", ">= 50%"]


def test_the_sampling_part_measures_the_default_sampler_and_searches_the_largest_micro_batch(tmp_path, one_thread):
    got = _part("sampling", tmp_path)
    assert got["info"]["sampler"] == "ddim eta 1.0, 25 steps, guidance 1.5"  # the tiny preset's defaults
    assert got["info"]["largest micro-batch that fits"] == 4  # nothing runs out of memory on the CPU: the bound
    small, large = got["rows"]
    assert (small["micro-batch"], large["micro-batch"]) == (2, 4)
    assert small["TFLOP/image"] == large["TFLOP/image"] > 0
    for r in got["rows"]:
        assert r["images/s"] > 0 and math.isclose(r["images/day"], 86400 * r["images/s"])
    best = max(got["rows"], key=lambda r: r["images/s"])
    assert got["targets"][0]["value"] == f"{best['images/s']:.2f}"


def test_the_training_part_measures_each_precision_and_layout_at_its_largest_batch(tmp_path, one_thread):
    got = _part("training", tmp_path)
    assert [r["row"] for r in got["rows"]] == ["fp32 contiguous", "fp32 channels_last", "bf16 contiguous",
                                               "bf16 channels_last"]
    for r in got["rows"]:
        assert r["batch"] == 2 and r["images/s"] > 0 and r["% peak"] > 0 and r["skipped"] == 0
        assert math.isfinite(r["loss start"]) and math.isfinite(r["loss end"])
    assert got["info"]["fp32: largest batch"] == "2 (of [1, 2])"
    assert got["targets"][0]["goal"] == "> 1"
