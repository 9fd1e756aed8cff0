"""Tests of tools/gpu_check.py on the CPU: --smoke end to end (every step's record, its counts,
what compiled, peak memory keys, report.md), a failing step that the next one outlives, a step
killed at its time limit, and pytest's summary line as pytest writes it. No GPU, no network."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # grpo_rm.py and tools/: no packages
import gpu_check as C  # noqa: E402
import report  # noqa: E402

INSIDE = pytest.mark.skipif(os.environ.get("GRPO_RM_GPU_CHECK") == "1",
                            reason="gpu_check.py runs this suite: its smoke is not run inside it")


def check(*argv, timeout=600):
    """gpu_check.py in a process of its own, as a user runs it -> (exit code, output)."""
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "gpu_check.py"), *argv],
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@INSIDE
def test_smoke_end_to_end(tmp_path):
    t0 = time.time()
    code, out = check("--smoke", "--out", str(tmp_path))
    print(f"--smoke: {time.time() - t0:.0f} s")
    assert code == 0, out
    res = json.loads((tmp_path / "cpu" / "check.json").read_text())
    steps = {r["step"]: r for r in res["steps"]}
    assert list(steps) == list(C.STEPS) and res["smoke"] and res["device"] == "cpu"
    for r in steps.values():  # every record has the same keys; peak GPU memory: none on the CPU
        assert {"status", "reason", "command", "seconds", "exit_code", "peak_gpu_gb",
                "peak_rss_gb"} <= set(r) and r["peak_gpu_gb"] is None
    skipped = {n for n, r in steps.items() if r["status"] == "skipped"}
    assert skipped == {"dinov3-eager", "dinov3-compile", "suite"}
    assert "--dinov3 DIR" in steps["dinov3-eager"]["reason"]
    assert "--smoke" in steps["suite"]["reason"]  # the suite runs --smoke: no recursion
    for name in set(C.STEPS) - skipped:
        r = steps[name]
        assert (r["status"], r["exit_code"]) == ("passed", 0) and r["peak_rss_gb"] > 0.1, r
        assert C.ROOT not in r["command"] and r["command"].startswith("python3 ")
    # each compiled run counts its own graphs: the model, θ_old (no grad) and the loss
    comp = steps["dinov2-compile"]["figures"]["compiled"]
    assert comp["unique_graphs"] >= 3 and comp["graph_breaks"] >= 0
    assert comp["recompiles"] == sum(why is not None for _, why in comp["frames"])
    assert any(f.startswith("forward (grpo_rm.py:") for f, _ in comp["frames"])
    assert steps["dinov2-eager"]["figures"]["compiled"]["unique_graphs"] == 1  # the loss alone
    eager = steps["dinov2-eager"]["figures"]
    assert eager["ce"]["img_per_s"] > 0 and eager["grpo"]["time_ratio"] > 0
    assert steps["dinov2-seg"]["figures"]["loss"]["c"] == 150  # ADE20k's classes, every pixel
    loss = steps["loss"]["figures"]  # one graph for both shapes: dynamic, no recompile
    assert [(L["n"], L["c"]) for L in loss["losses"]] == [(256, 150), (64, 21)]
    assert loss["compiled"]["unique_graphs"] == 1 and loss["compiled"]["recompiles"] == 0
    assert all(L[m]["saved_bytes"] > 0 for L in loss["losses"] for m in ("ce", "grpo_compiled"))
    run = steps["torchrun"]["figures"]
    assert run["world_size"] == 1 and run["dist_backend"] == "gloo" and set(run["metrics"]) == {
        "sr", "knn"}
    # the benchmarks' JSONs beside, which tools/report.py reads as Table 5's rows
    benches = [json.loads(p.read_text()) for p in sorted((tmp_path / "cpu").glob("bench-*.json"))]
    rows = report.bench_table(benches, [])
    assert len(benches) == 3 and sum("| grpo |" in row for row in rows) == 3
    md = (tmp_path / "cpu" / "report.md").read_text()
    assert f"torch {torch.__version__}" in md and "python3 tools/gpu_check.py --smoke" in md
    assert all(f"| {n} | {steps[n]['status']} |" in md for n in C.STEPS) and "3,932" in md


def test_a_failing_step_is_recorded_and_the_next_runs(tmp_path):
    bad = tmp_path / "hub"  # a torch.hub folder without the entry point
    bad.mkdir()
    (bad / "hubconf.py").write_text("dependencies = []\n")
    code, out = check("--smoke", "--only", "dinov2-eager,loss", "--dinov2", str(bad), "--out",
                      str(tmp_path / "out"))
    assert code == 1, out
    res = json.loads((tmp_path / "out" / "cpu" / "check.json").read_text())
    steps = {r["step"]: r for r in res["steps"]}
    failed = steps["dinov2-eager"]
    assert (failed["status"], failed["reason"], failed["exit_code"]) == ("failed", "exit code 2",
                                                                         2)
    assert failed["tail"][-1].startswith("error: ") and "hubconf.py" in failed["tail"][-1]
    assert steps["loss"]["status"] == "passed"  # the step after it ran
    assert steps["torchrun"]["reason"] == "not in --only"
    md = (tmp_path / "out" / "cpu" / "report.md").read_text()
    assert "## dinov2-eager: exit code 2" in md and "| dinov2-eager | failed |" in md


def gone(pid):
    """The process has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_step_is_stopped_at_its_limit_with_its_children(tmp_path):
    t0 = time.time()
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; child = subprocess.Popen("
               "[sys.executable, '-c', 'import time; time.sleep(60)']); print(child.pid, "
               "flush=True); time.sleep(60)"]
    r = C.step("loss", sleeper, None, 10, os.environ, str(tmp_path), str(tmp_path))
    assert 10 <= time.time() - t0 < 20
    assert (r["status"], r["reason"], r["exit_code"]) == ("failed", "timed out after 10 s", None)
    assert r["peak_rss_gb"] > 0 and r["cpu_seconds"] > 0
    [child] = r["tail"]  # its child too (pytest's, say): none of its processes outlives the step
    while not gone(int(child)) and time.time() - t0 < 25:
        time.sleep(0.1)
    assert gone(int(child))


def test_a_step_is_stopped_at_its_limit_with_torchruns_workers(tmp_path):
    # torchrun's workers run in sessions of their own: stopping its process group is not enough
    (tmp_path / "worker.py").write_text("import os, time\nprint('worker', os.getpid(), flush=True)"
                                        "\ntime.sleep(120)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(tmp_path / "worker.py")]
    t0 = time.time()
    r = C.step("torchrun", cmd, None, 15, os.environ, str(tmp_path), str(tmp_path))
    assert 15 <= time.time() - t0 < 40
    assert (r["status"], r["reason"], r["exit_code"]) == ("failed", "timed out after 15 s", None)
    assert r["peak_rss_gb"] > 0
    log = (tmp_path / "torchrun.log").read_text().splitlines()
    [worker] = [int(line.split()[-1]) for line in log if line.startswith("worker ")]
    while not gone(worker) and time.time() - t0 < 60:
        time.sleep(0.1)
    assert gone(worker)


def test_pytest_summary_lines(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 0\n"
        "def test_skip(): pytest.skip('why')\n"
        "@pytest.mark.xfail\n"
        "def test_xfail(): assert 0\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError\n"
        "def test_error(broken): pass\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert C.pytest_counts(p.stdout) == {"passed": 1, "failed": 1, "skipped": 1, "error": 1,
                                         "xfailed": 1}
    assert C.pytest_counts("202 passed, 3 skipped, 2 warnings in 123.45s (0:02:03)") == {
        "passed": 202, "failed": 0, "skipped": 3, "error": 0, "warning": 2}
    assert C.pytest_counts("1 failed, 13 passed in 9.88s") == {
        "passed": 13, "failed": 1, "skipped": 0, "error": 0}
    assert C.pytest_counts("no tests ran in 0.01s") == {
        "passed": 0, "failed": 0, "skipped": 0, "error": 0}
    assert C.pytest_counts("Killed") is None  # no summary: the step fails


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_the_full_check_is_one_error_line(capsys):
    assert C.main(["--only", "loss"]) == 2
    assert capsys.readouterr().err == (
        "error: no GPU is visible; --smoke checks the same code on the CPU\n")
