import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_run_dir(monkeypatch):
    """train.py hands its run folder to DDP children through SSD_RUN_DIR; each test starts without one."""
    monkeypatch.delenv("SSD_RUN_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_train(args, env=None, timeout=600):
    """Run train.py as a user would, in a subprocess. Returns the CompletedProcess."""
    e = {k: v for k, v in os.environ.items() if k != "SSD_RUN_DIR"}
    e.update(env or {})
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
