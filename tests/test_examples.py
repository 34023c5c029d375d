"""The training example runs end to end (a few steps) and its loss goes down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_tiny_lm_runs_and_learns():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_tiny_lm.py"), "--steps", "8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+ +loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) >= 5, proc.stdout
    assert losses[-1] < losses[0] - 0.5, proc.stdout  # about 4.7 at the start, 3.5 after 8 steps
    assert "layer 0 bias per head" in proc.stdout
