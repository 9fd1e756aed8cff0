"""Every bad input grpo_rm.py refuses, run as a user would run it: prints a Markdown table of the
command's flags, its exit code, the number of error lines and of tracebacks on stderr (other
than torchrun's own report), and the error line (results/README.md#bad-input says how to read it).

    python3 tools/bad_inputs.py --hub-repo HUB --model NAME --data-dir CLS_FOLDER --voc-dir VOC
        [--torchrun]

CLS_FOLDER is an image folder (train/<class>/*, test/<class>/*), VOC a VOC-layout folder whose
masks hold fewer classes than Pascal VOC's 21; --torchrun also runs the rows marked for it under
torchrun --nproc_per_node=2 (gloo).
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.mkdtemp()
HOME = os.path.expanduser("~")
NAMES = []  # (a folder given on the command line, its name in the table)
SCRIPT = os.path.join(HERE, "..", "grpo_rm.py")

# (what, flags added to a small valid run, also under torchrun)
CASES = [
    ("batch size 0", ["--batch-size", "0"], False),
    ("hidden width 0", ["--hidden", "0"], False),
    ("negative lr", ["--lr", "-1"], False),
    ("negative clip range", ["--clip-eps", "-0.1"], False),
    ("no epochs", ["--epochs", "0"], False),
    ("no evaluation epochs", ["--eval-epochs", "0"], False),
    ("image size 0", ["--img-size", "0"], False),
    ("seg size 0", ["--seg-size", "0"], False),
    ("evaluation lr 0", ["--eval-lr", "0"], False),
    ("subset above 1", ["--subset", "1.5"], False),
    ("negative workers", ["--workers", "-1"], False),
    ("log every 0", ["--log-every", "0"], False),
    ("dual clip at most 1", ["--dual-clip", "1"], False),
    ("θ_old refresh every 0 steps", ["--old-every", "0"], False),
    ("not a number", ["--lr", "fast"], False),
    ("bad --hub-kwargs", ["--hub-kwargs", "{oops"], False),
    ("bad --feature-type", ["--feature-type", "linear", "x"], False),
    ("task of another dataset", ["--task", "seg"], False),
    ("no GPU for --device cuda", ["--device", "cuda"], False),
    ("image size not a multiple of the patch", ["--img-size", "30"], False),
    ("--num-classes against the folders", ["--num-classes", "7"], False),
    ("data folder missing", ["--data-dir", "no-such-dir"], True),
    ("hub unreachable", ["--hub-repo", "no-such-owner-x/no-such-repo-x"], True),
    ("hub folder without hubconf.py", ["--hub-repo", "."], False),
    ("weights that do not fit", ["--weights", "WEIGHTS"], False),
    ("batch not divisible by the processes", ["--batch-size", "9"], "only"),
]


def call(cmd, timeout=600):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stderr


def scrub(text):
    """No paths of the machine that ran it: the given folders, the copied data, the repository,
    the home folder."""
    for path, name in NAMES + [(TMP, "TMP"), (os.path.dirname(HERE), "REPO"), (HOME, "~")]:
        text = text.replace(path, name)
    return text


def row(what, flags, rc, err):
    """One table row. Under torchrun the launcher exits 1 and prints its own ChildFailedError
    report (a traceback of torch.distributed.run); the ranks' codes are in that report."""
    err = scrub(err)
    ranks = dict(re.findall(r"rank\s+:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", err))
    if ranks:
        rc = f"{rc} (ranks: {', '.join(ranks[r] for r in sorted(ranks))})"
    traces = [t for t in err.split("Traceback (most recent call last)")[1:]
              if "ChildFailedError" not in t]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or " error: " in ln]
    msg = lines[0] if lines else (err.strip().splitlines() or ["(nothing)"])[-1]
    msg = msg.replace("|", "\\|")[:240]
    shown = scrub(" ".join(flags))
    print(f"| {what} | `{shown}` | {rc} | {len(lines)} | {len(traces)} | "
          f"{msg} |", flush=True)


def small_copy(src, dst, per_class=4):
    """The first per_class images of every class of an image folder."""
    for split in ("train", "test"):
        for c in sorted(os.listdir(os.path.join(src, split))):
            os.makedirs(os.path.join(dst, split, c))
            for f in sorted(os.listdir(os.path.join(src, split, c)))[:per_class]:
                shutil.copy(os.path.join(src, split, c, f), os.path.join(dst, split, c, f))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--hub-repo", "--model", "--data-dir", "--voc-dir"):
        p.add_argument(flag, required=True)
    p.add_argument("--torchrun", action="store_true")
    a = p.parse_args()
    NAMES.extend([(a.hub_repo, "HUB"), (a.data_dir, "DATA"), (a.voc_dir, "VOC")])
    tmp = TMP
    data = os.path.join(tmp, "data")
    small_copy(a.data_dir, data)
    weights = os.path.join(tmp, "other_model.pt")
    torch.save({"head.weight": torch.zeros(2, 2)}, weights)  # another model's weights
    base = ["--dataset", "imagefolder", "--data-dir", data, "--hub-repo", a.hub_repo, "--model",
            a.model, "--epochs", "1", "--batch-size", "8", "--eval-epochs", "1", "--workers", "0",
            "--device", "cpu", "--img-size", "32", "--out", os.path.join(tmp, "runs")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port", "29517", SCRIPT]
    print("| bad input | flags | exit code | error lines | tracebacks | message |")
    print("|---|---|---|---|---|---|")
    for what, flags, both in CASES:
        flags = [weights if f == "WEIGHTS" else f for f in flags]
        if both != "only":
            row(what, flags, *call([sys.executable, SCRIPT, *base, *flags]))
        if a.torchrun and both:
            row(what + " (torchrun, 2 processes)", flags, *call([*torchrun, *base, *flags]))
    cases = [("VOC layout, 11 classes, as --dataset voc", ["--dataset", "voc", "--data-dir",
              a.voc_dir, "--task", "seg", "--img-size", "64"])]
    broken = os.path.join(tmp, "broken")
    shutil.copytree(data, broken)
    test0 = os.path.join(broken, "test", sorted(os.listdir(os.path.join(broken, "test")))[0])
    with open(os.path.join(test0, sorted(os.listdir(test0))[0]), "wb") as f:
        f.write(b"truncated")
    cases.append(("a broken test image", ["--data-dir", broken]))
    for what, flags in cases:
        row(what, flags, *call([sys.executable, SCRIPT, *base, *flags]))
        if a.torchrun and what.startswith("a broken"):
            row(what + " (torchrun, 2 processes)", flags, *call([*torchrun, *base, *flags]))
    stop_and_resume(base, tmp)
    shutil.rmtree(tmp)


def stop_and_resume(base, tmp):
    """A SIGTERM in training (exit 3), the same command again (refused: --resume or --force), and
    a resume with another setting (refused)."""
    flags = ["--epochs", "50", "--name", "stopped"]
    proc = subprocess.Popen([sys.executable, "-u", SCRIPT, *base, *flags], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("epoch 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=600)
    row("SIGTERM during training", flags, proc.returncode, err)
    row("the stopped run again, no --resume", flags, *call([sys.executable, SCRIPT, *base, *flags]))
    other = [*flags, "--resume", "--lr", "0.5"]
    row("--resume with another lr", other, *call([sys.executable, SCRIPT, *base, *other]))


if __name__ == "__main__":
    main()
