"""run_all.sh's command line: its help names every target, what it costs, and what `all` runs."""
import os
import re
import subprocess

RUN_ALL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_all.sh")


def test_help_names_every_target_and_its_time():
    p = subprocess.run(["bash", RUN_ALL, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == ""
    block = p.stdout.split("Targets")[1].split("Environment")[0]
    targets = re.search(r"usage: bash run_all.sh \{(.*?)\}", open(RUN_ALL).read())[1].split("|")
    for target in targets:  # each one, with a duration or an estimate
        entry = re.search(rf"\n  (\S+ )*{target}\b.*?(?=\n  \S|$)", block, re.S)
        assert entry and re.search(r"\d ?(min|h)\b|minutes|days", entry[0]), (target, block)
    assert "not mini, stable" in block  # what `all` leaves out, said


def test_no_target_is_the_usage_and_exit_2():
    p = subprocess.run(["bash", RUN_ALL], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--help" in p.stderr
