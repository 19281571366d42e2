"""benchmarks/gpu_speed.py: run at toy size on the CPU so the script cannot rot between GPU loans; a rerun of one
part keeps the others; its refusal where no CUDA device is visible."""
import json
import math
import os

import pytest
from helpers import ROOT, shared_cli

SCRIPT = f"{ROOT}/benchmarks/gpu_speed.py"


def gpu_speed(*argv, timeout=600):
    """`python benchmarks/gpu_speed.py ARGV`, forked from helpers' server: (exit code, stdout, stderr)."""
    return shared_cli().call("script", [SCRIPT, *map(str, argv)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=timeout)


def test_the_intervals_use_students_t_at_every_round_count():
    """A mean over n rounds has n - 1 degrees of freedom: 12 rounds take t = 2.201, not the normal's 1.96."""
    import sys

    from scipy import stats
    sys.path.insert(0, f"{ROOT}/benchmarks")
    import gpu_speed as gs
    for df in range(1, 300):
        assert abs(gs.t95(df) - stats.t.ppf(0.975, df)) < 0.002, df
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0]
    m, lo, hi = gs.mean_ci(values)
    exact = stats.t.ppf(0.975, 11) * stats.sem(values)
    assert m == pytest.approx(sum(values) / 12) and hi - m == pytest.approx(exact, rel=1e-4) and m - lo == hi - m


@pytest.mark.slow
def test_smoke_runs_every_part_and_a_rerun_of_one_keeps_the_others(tmp_path):
    code, stdout, stderr = gpu_speed("--smoke", "--device", "cpu", "--out", tmp_path)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads((tmp_path / "speed_cpu_smoke.json").read_text())["results"]
    assert list(report) == ["eager", "recipe", "compiled"]
    assert all(p["status"] == "ok" for p in report.values()), {k: p["summary"] for k, p in report.items()}
    eager = report["eager"]["data"]
    assert eager["rounds"] == 3 and len(eager["pairs"]) == 8  # 3 anchors x (timm, standalone) + 2 stitches
    profile = list(eager["profile"].values())  # anchor 1's route through the SN-Net, timm's own model
    assert profile[0]["cpu_ops"] == profile[1]["cpu_ops"] > 0  # the SN-Net's route runs no op timm's model does not
    assert len(report["recipe"]["data"]["step_ms"]) == 5 and report["recipe"]["data"]["ddp_step_ms"] > 0
    compiled = report["compiled"]["data"]
    assert math.isfinite(compiled["anchors_compiled_vs_timm"]) and compiled["distinct_routes"] == 2
    assert compiled["routes_compiled_more"] == 4 and compiled["snnet_compiled_ms_more"] > 0
    result = stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT gpu_vs_timm=") and "nan" not in result, result

    code, stdout, stderr = gpu_speed("--smoke", "--device", "cpu", "--out", tmp_path, "--parts", "eager", "--keep")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    again = json.loads((tmp_path / "speed_cpu_smoke.json").read_text())["results"]
    assert again["recipe"] == {**report["recipe"], "kept": True} and again["compiled"]["kept"]
    assert "kept" not in again["eager"] and again["eager"]["data"] != report["eager"]["data"]  # timed anew
    md = (tmp_path / "speed_cpu_smoke.md").read_text()
    assert "| recipe (kept from the run before) | ok |" in md and md.count("\n## ") == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_without_cuda_one_line_and_exit_2(tmp_path):
    code, stdout, stderr = gpu_speed("--out", tmp_path, timeout=120)
    assert code == 2 and stderr.count("\n") == 1 and "no CUDA device" in stderr, stderr
    assert not list(tmp_path.iterdir())
