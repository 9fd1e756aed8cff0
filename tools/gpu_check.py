"""Check the project on one GPU with one command: the test suite, tools/bench.py on the real DINOv2
ViT-S/14 and DINOv3 ViT-S/16 code (random init; eager and compiled, with what compiled), the loss
alone at segmentation size, and a short torchrun run through training and evaluation.

    python3 tools/gpu_check.py --dinov2 DINOV2_CLONE --dinov3 DINOV3_CLONE   # one GPU, < 8 min
    python3 tools/gpu_check.py --smoke --out OUT                             # the CPU, toy sizes

Writes OUT/<device>/: check.json (each step's status, time, peak memory, figures), report.md and
the benchmarks' bench-*.json and loss-*.json (tools/report.py reads them). Each step runs in its
own process under a time limit: a failing step is recorded with its last lines, the next one runs,
and the exit code is 1.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
STEPS = ("dinov2-eager", "dinov2-compile", "dinov3-eager", "dinov3-compile", "dinov2-seg", "loss",
         "torchrun", "suite")
LIMIT_S = {"eager": 90, "compile": 200, "seg": 120, "loss": 90, "torchrun": 150, "suite": 300}
PIN = '{"pretrained": false}'  # random init: the code is timed, not the weights
SIZES = {False: dict(cls="--img-size 224 --batch-size 256", seg="--batch-size 64",  # 448 px
                     time="--steps 10 --warmup 2 --rounds 3", loss="65536,150,16384,21",
                     run="--img-size 224 --batch-size 32 --workers 2 --dist-backend nccl"),
         True: dict(cls="--img-size 16 --batch-size 4", seg="--img-size 16 --seg-size 8 "
                    "--batch-size 4", time="--steps 2 --warmup 1 --rounds 2", loss="256,150,64,21",
                    run="--img-size 16 --batch-size 8 --workers 0 --dist-backend gloo")}
# One H100, the code before the rewrite (results/bench-gpu/, 2026-11-23): (figure, its value, the
# step and key of this run's). Shown beside this run's as ratios, never asserted.
EARLIER = [
    ("ViT-S/14 224 px b256 eager: ce img/s", 3932, "dinov2-eager", "ce", "img_per_s"),
    ("ViT-S/14 224 px b256 eager: ce MFU %", 14.8, "dinov2-eager", "ce", "mfu_pct"),
    ("ViT-S/14 224 px b256 eager: grpo/ce time", 1.336, "dinov2-eager", "grpo", "time_ratio"),
    ("ViT-S/14 224 px b256 compiled: ce img/s", 3914, "dinov2-compile", "ce", "img_per_s"),
    ("seg 448 px b64, c = 150: grpo/ce time", 1.516, "dinov2-seg", "grpo", "time_ratio"),
    ("seg step's loss, 64·128² x 150: GRPO-RM ms", 19.2, "dinov2-seg", "loss", "grpo_eager_ms"),
    ("seg step's loss, 64·128² x 150: cross-entropy ms", 4.1, "dinov2-seg", "loss", "ce_ms"),
    ("ViT-S/16 compiled: ce img/s (fwd + bwd ≈ 8,000)", 8000, "dinov3-compile", "ce", "img_per_s")]

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    a = p.add_argument
    a("--dinov2", metavar="DIR", help="a clone of facebookresearch/dinov2; default: "
      "$GRPO_RM_DINOV2, else ../shared/dinov2 (as the tests'); --smoke: tools/tinyvit's look-alike")
    a("--dinov3", metavar="DIR", help="a clone of facebookresearch/dinov3; default: "
      "$GRPO_RM_DINOV3, else ../shared/dinov3; --smoke: none")
    a("--data", metavar="DIR", help="the torchrun run's image folder, train/<class>/* and "
      "val/<class>/*; default: 3 classes of JPEGs, written to a temporary folder")
    a("--out", default=os.path.join(ROOT, "results", "bench-gpu"), help="writes OUT/DEVICE/")
    a("--only", type=lambda s: s.split(","), default=STEPS, metavar="STEP,...",
      help="of " + ",".join(STEPS))
    a("--budget", type=float, default=470, help="seconds for all the steps together")
    a("--smoke", action="store_true", help="the CPU, toy sizes, no suite (the suite runs this)")
    args = p.parse_args(argv)
    if set(args.only) - set(STEPS):
        p.error(f"--only {','.join(args.only)}: the steps are {','.join(STEPS)}")
    for name, smoke in (("dinov2", os.path.join(TOOLS, "tinyvit")), ("dinov3", None)):
        tests = os.environ.get(f"GRPO_RM_{name.upper()}", os.path.join(ROOT, "..", "shared", name))
        setattr(args, name, getattr(args, name) or (smoke if args.smoke else tests))
    for k in ("dinov2", "dinov3", "data", "out"):  # the steps run in the repository's root
        setattr(args, k, getattr(args, k) and os.path.abspath(getattr(args, k)))
    return args

def shown(path):  # a path as the report prints it: relative to the repository, if inside or beside
    rel = os.path.relpath(path, ROOT)
    return rel if not rel.startswith(os.path.join("..", "..")) else path

def missing(flag, folder):
    """Why a torch.hub folder cannot be used, or None."""
    if not folder or not os.path.isfile(os.path.join(folder, "hubconf.py")):
        return f"no torch.hub folder: {flag} DIR" + (f" ({shown(folder)} has no hubconf.py)"
                                                    if folder else "")
    need = [m for m in ("torchmetrics", "termcolor") if flag == "--dinov3"
            and importlib.util.find_spec(m) is None]  # DINOv3's hub code imports them
    return f"DINOv3's hub code needs: pip install {' '.join(need)}" if need else None

def image_folder(root, n_train, n_val, size):
    """train/<class>/*.jpg and val/<class>/*.jpg, 3 classes: each a colour under noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(3):
            os.makedirs(os.path.join(root, split, f"class{c}"))
            for i in range(n):
                pixels = np.roll([200, 40, 40], c) + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(root, split, f"class{c}", f"{i}.jpg"), quality=90)
    return root

def plan(args, tmp):
    """-> [(step, command, why it is skipped or None, time limit s)], in the order they run."""
    s, py = SIZES[args.smoke], sys.executable
    dev = ["--device", "cpu"] if args.smoke else ["--device", "cuda", "--dtype", "bf16"]
    def bench(name, *a):
        return [py, "tools/bench.py", *s["time"].split(), *dev, "--workers", "0", "--out",
                os.path.join(tmp, name), *a]
    why = {f: missing(f"--{f}", getattr(args, f)) for f in ("dinov2", "dinov3")}
    hub = {f: ["--hub-repo", str(getattr(args, f)), "--model", m, "--hub-kwargs", PIN] for f, m in
           (("dinov2", "dinov2_vitt_test" if args.smoke else "dinov2_vits14"),
            ("dinov3", "dinov3_vits16"))}
    steps = [(f"{f}-{m}", bench(f"{f}-{m}", "--dataset", "imagenet", *hub[f], *s["cls"].split(),
                                *(["--compile"] if m == "compile" else [])), why[f], LIMIT_S[m])
             for f in ("dinov2", "dinov3") for m in ("eager", "compile")]
    steps += [("dinov2-seg", bench("dinov2-seg", "--dataset", "ade20k", *hub["dinov2"],
                                   *s["seg"].split()), why["dinov2"], LIMIT_S["seg"]),
              ("loss", bench("loss", "--dataset", "ade20k", "--loss-only", s["loss"]), None,
               LIMIT_S["loss"])]
    tiny = ["--hub-repo", os.path.join(TOOLS, "tinyvit"), "--model", "dinov2_vitt_test",
            "--hub-kwargs", PIN]  # without a DINOv2 clone the run takes the look-alike
    data = args.data or image_folder(os.path.join(tmp, "data"), *(8, 4, 16) if args.smoke else
                                     (32, 8, 64))
    steps.append(("torchrun", [py, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=1", "grpo_rm.py", "--dataset", "imagefolder",
                               "--data-dir", data, *(tiny if why["dinov2"] else hub["dinov2"]),
                               *s["run"].split(), *dev, "--epochs", "2", "--eval-epochs", "3",
                               "--out", os.path.join(tmp, "torchrun"), "--name", "run"],
                  None, LIMIT_S["torchrun"]))
    steps.append(("suite", [py, "-m", "pytest", "-q"], "--smoke runs no suite (the suite runs "
                  "--smoke)" if args.smoke else None, LIMIT_S["suite"]))
    return [(n, c, w if n in args.only else w or "not in --only", t) for n, c, w, t in steps]

def run(cmd, limit, env, log):
    """cmd in a process group of its own, stopped at the limit -> (exit code, None if it was
    stopped; the kernel's count for it and its children: peak resident GiB, CPU seconds)."""
    # SIGTERM first: torchrun passes it on to its workers, which run in sessions of their own
    signals, t0, pid = [(limit, signal.SIGTERM), (limit + 15, signal.SIGKILL)], time.time(), 0
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        while not pid:
            time.sleep(0.1)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if not pid and len(signals) and time.time() - t0 > signals[0][0]:
                os.killpg(p.pid, signals.pop(0)[1])  # the whole group: pytest's children too
    p.returncode = -1  # reaped here: subprocess must not wait for it again
    code = os.waitstatus_to_exitcode(status) if len(signals) == 2 else None
    return code, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime

def pytest_counts(text):
    """pytest's last summary line ("3 passed, 1 skipped, 2 warnings in 9.10s") -> {outcome: n}."""
    lines = [line for line in text.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    if not lines:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for n, what in re.findall(r"(\d+) ([a-z]+)", lines[-1]):
        counts[what.rstrip("s") if what in ("errors", "warnings") else what] = int(n)
    return counts

def read(name, out, text, folder):
    """What a step measured -> (figures, peak GPU GiB or None, why it failed or None). A
    benchmark's JSON is copied into folder."""
    if name == "suite":
        counts = pytest_counts(text)
        return {"counts": counts}, None, None if counts else "no pytest summary line"
    if name == "torchrun":
        with open(os.path.join(out, "run", "result.json")) as f:
            r = json.load(f)
        keys = ("metrics", "world_size", "device", "sec_per_epoch", "eval_seconds")
        return ({k: r[k] for k in keys} | {k: r["config"][k] for k in ("dtype", "dist_backend")},
                r["peak_memory_gb"], None)
    [path] = glob.glob(os.path.join(out, "*.json"))
    shutil.copy(path, folder)
    with open(path) as f:
        res = json.load(f)
    comp = res["compiled"]
    if "losses" in res:  # the loss alone: one graph for every shape, under training's autocast
        rows = [{"n": L["n"], "c": L["c"]} | {m: {k: L[m].get(k) for k in ("ms", "time_ratio",
                "saved_bytes", "peak_bytes")} for m in ("ce", "grpo_eager", "grpo_compiled")}
                for L in res["losses"]]
        peak = max(L[m]["peak_bytes"] or 0 for L in rows for m in ("ce", "grpo_compiled"))
        once = comp["unique_graphs"] == 1 and not comp["recompiles"] + comp["graph_breaks"]
        why = None if once else "the loss did not compile once for all shapes (see compiled)"
        return {"losses": rows, "compiled": comp}, peak / 2**30 or None, why
    fig = {m: {"img_per_s": r["img_per_s"], "ms_per_step": r["ms_per_step"],
               "peak_memory_gb": r["peak_memory_gb"], "mfu_pct": r["mfu"] and 100 * r["mfu"]}
           for m, r in res["methods"].items()}
    fig["grpo"]["time_ratio"] = res["methods"]["grpo"]["time_ratio"]
    L = res["loss"]  # the loss alone at the run's shape
    fig["loss"] = {"n": L["n"], "c": L["c"]} | {f"{m}_ms": L[m]["ms"] for m in
                                                 ("ce", "grpo_eager", "grpo_compiled")}
    model = any(f.startswith("forward ") for f, _ in comp["frames"])  # the network's
    why = "the model did not compile" if res["config"]["compile"] and not model else None
    return fig | {"compiled": comp}, fig["grpo"]["peak_memory_gb"], why

def step(name, cmd, why, limit, env, tmp, folder):
    """One step, bounded -> its record: status, reason, seconds, peak memory, figures."""
    show = ["python3" if a == sys.executable else a.replace(tmp, "TMP") for a in cmd]
    show = [shown(a) if os.path.isabs(a) else a for a in show]
    rec = {"step": name, "status": "skipped", "reason": why, "command": shlex.join(show),
           "seconds": 0.0, "exit_code": None, "peak_gpu_gb": None, "peak_rss_gb": None}
    if why:
        return rec
    if limit < 10:
        return rec | {"status": "failed", "reason": "not run: the --budget was spent"}
    log, t0 = os.path.join(tmp, f"{name}.log"), time.time()
    code, rss, cpu = run(cmd, limit, env, log)
    with open(log, errors="replace") as f:
        text = f.read()
    rec |= {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu, 1),
            "exit_code": code, "peak_rss_gb": rss}
    problem = (f"timed out after {limit:.0f} s" if code is None else
               f"exit code {code}" if code else None)
    if code == 0 or (name == "suite" and code is not None):  # the suite's counts, failed or not
        try:
            rec["figures"], rec["peak_gpu_gb"], why = read(name, os.path.join(tmp, name), text,
                                                           folder)
            problem = problem or why
        except Exception as e:  # whatever is wrong with this step, the next one runs
            problem = f"its output could not be read ({type(e).__name__}: {e})"
    rec |= {"status": "failed" if problem else "passed", "reason": problem}
    return rec | ({"tail": text.splitlines()[-40:]} if problem else {})

def num(x, fmt=",.1f"):
    return "—" if x is None else format(x, fmt)

def result_line(r):
    """One line of what a step measured, or why it did not pass."""
    f = r.get("figures") or {}
    if "counts" in f:
        return ", ".join(f"{v} {k}" for k, v in f["counts"].items()) + (
            f" ({r['reason']})" if r["reason"] else "")
    if r["status"] != "passed":
        return r["reason"]
    c = f.get("compiled", {})
    graphs = (f"; {c.get('unique_graphs')} graphs, {c.get('graph_breaks')} breaks, "
              f"{c.get('recompiles')} recompiles")
    if "metrics" in f:
        alone = " (unused: one process starts no process group)" if f["world_size"] == 1 else ""
        return (f"{f['device']}, world {f['world_size']}, {f['dtype']}, {f['dist_backend']}"
                f"{alone}: " +
                ", ".join(f"{k} {v:.2f}" for k, v in f["metrics"].items()))
    if "losses" in f:
        L = f["losses"][0]
        return (f"{L['n']} x {L['c']}: ce {L['ce']['ms']:.2f} ms, GRPO-RM eager "
                f"×{L['grpo_eager']['time_ratio']:.2f}, compiled "
                f"×{L['grpo_compiled']['time_ratio']:.2f}" + graphs)
    ce, g = f["ce"], f["grpo"]
    return (f"img/s ce {num(ce['img_per_s'])}, grpo {num(g['img_per_s'])}: time "
            f"×{g['time_ratio']:.3f}; MFU ce {num(ce['mfu_pct'])} %" + graphs)

def report(meta, recs):
    """report.md: the steps, this run beside the earlier H100 figures, what compiled, the loss
    alone, and each failure's last lines."""
    by = {r["step"]: r.get("figures") or {} for r in recs}
    out = [f"# Check on {meta['device']}", "", f"`{meta['command']}` on {meta['date']}: torch "
           f"{meta['torch']}, CUDA {meta['cuda']}, {meta['seconds']:.0f} s. The benchmarks: "
           "tools/bench.py on synthetic batches, random init. Peak GPU memory: the allocator's "
           "(grpo's in a benchmark); peak RSS: the step's processes'." + (
               " --smoke: toy sizes on the CPU, so the figures show the report's form only."
               if meta["smoke"] else ""), "",
           "| step | status | s | peak GPU GB | peak RSS GB | result |", "|" + "---|" * 6]
    out += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {num(r['peak_gpu_gb'], '.2f')}"
            f" | {num(r['peak_rss_gb'], '.2f')} | {result_line(r)} |" for r in recs]
    out += ["", "## This run beside the earlier one (one H100, the code before the rewrite)", "",
            "| figure | earlier | this run | this / earlier |", "|---|---|---|---|"]
    for what, then, name, a, b in EARLIER:
        now = by[name].get(a, {}).get(b)
        out.append(f"| {what} | {then:,} | {num(now, ',.4g')} | "
                   f"{'—' if now is None else f'×{now / then:.3f}'} |")
    out += ["", "## What compiled (dynamo's counters; each run its own process)", "",
            "| step | graphs | breaks | recompiles | frames (recompile reason) | break reasons |",
            "|" + "---|" * 6]
    out += [f"| {name} | {c['unique_graphs']} | {c['graph_breaks']} | {c['recompiles']} | "
            + "; ".join(fn + (f" ({why.strip()})" if why else "") for fn, why in c["frames"])
            + f" | {'; '.join(c['break_reasons'])} |"
            for name, f in by.items() if (c := f.get("compiled"))]
    out += ["", "`inner (external_utils.py)` is torch.compile's wrapper of a functools.partial: "
            "the loss. An eager benchmark compiles it too, to time it."]
    out += ["", "## The loss alone, forward + backward, under autocast", "",
            "| N x c | method | ms | x ce | saved MiB | x ce | peak MiB |", "|" + "---|" * 7]
    for L in by["loss"].get("losses", []):
        for m in ("ce", "grpo_eager", "grpo_compiled"):
            r, saved = L[m], L[m]["saved_bytes"]
            out.append(f"| {L['n']} x {L['c']} | {m} | {r['ms']:.2f} | ×{r['time_ratio']:.2f} | "
                       f"{saved / 2**20:.1f} | ×{saved / L['ce']['saved_bytes']:.2f} | "
                       f"{num(r['peak_bytes'] and r['peak_bytes'] / 2**20)} |")
    for r in recs:
        if r.get("tail"):
            out += ["", f"## {r['step']}: {r['reason']}", "", "```", *r["tail"], "```"]
    return "\n".join(out) + "\n"

def main(argv=None):
    args = get_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no GPU is visible; --smoke checks the same code on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    folder = os.path.join(args.out, re.sub(r"[^\w.-]+", "-", device))
    os.makedirs(folder, exist_ok=True)
    env = os.environ | {"PYTHONUNBUFFERED": "1", "GRPO_RM_GPU_CHECK": "1"}  # the suite: no smoke
    if args.smoke:  # the CPU, even on a GPU machine; one thread each, as two steps share 2 cores
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                # dynamo traces the same graphs, for aot_eager rather than inductor, whose C++
                # build takes minutes on 2 cores
                "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}
    else:  # the suite's real-model tests take the clones too
        env |= {f"GRPO_RM_{f.upper()}": getattr(args, f) for f in ("dinov2", "dinov3")}
    t0 = time.time()

    def one(s):  # a step, within what is left of the budget
        r = step(*s[:3], min(s[3], args.budget - (time.time() - t0)), env, tmp, folder)
        print(f"{r['step']}: {r['status']} ({r['seconds']:.0f} s) {result_line(r)}", flush=True)
        return r
    # --smoke runs two steps at a time (its times mean nothing; most are Python's, on one core);
    # on a GPU one at a time, each timed alone
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1 + args.smoke) as pool:
        recs = list(pool.map(one, plan(args, tmp)))
    cmd = ["python3", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    meta = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - t0),
            "smoke": args.smoke, "command": shlex.join(cmd)}
    with open(os.path.join(folder, "check.json"), "w") as f:
        json.dump(meta | {"steps": recs}, f, indent=1)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(report(meta, recs))
    print(f"wrote {shown(folder)}: check.json, report.md")
    return 1 if any(r["status"] == "failed" for r in recs) else 0

if __name__ == "__main__":
    sys.exit(main())
