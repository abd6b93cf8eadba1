"""The examples run as a user would run them."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_rl_loop_has_zero_sampler_trainer_gap(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "rl_loop.py"), "--steps", "2"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ROLLOUT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"max \|sampler - trainer\| log-prob (\S+), engine now at weight "
                       r"version (\d+) \(checksum match: (\w+)\)", done.stdout)
    assert steps == [("0.0e+00", "1", "True"), ("0.0e+00", "2", "True")]
