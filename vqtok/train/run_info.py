"""run_info.json: what produced a training run, beside its config.yaml, for reproducing it.

One record per start of the run: the first, then one per resume (appended; the earlier records are kept). A record
holds the versions of vqtok, Python, torch and Accelerate, the platform, the git commit of vqtok's source when it
runs from a git checkout (with whether tracked files differ from that commit), the command line, the number of
processes, the device type, the mixed precision used, the UTC start time, the step it started from, and what it
trained on when that is not in config.yaml (a user's dataset given to `train(config, dataset=...)`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import accelerate
import torch

from vqtok.files import write_text_atomically
from vqtok.version import __version__

RUN_INFO = "run_info.json"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vqtok/


def run_record(accelerator: accelerate.Accelerator, mixed_precision: str, *, start_step: int,
               data: str | None) -> dict[str, Any]:
    """This start of the run, as run_info.json records it (see the module docstring)."""
    return {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "start_step": start_step,
        "vqtok": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "git": git_state(PACKAGE_DIR),
        "command": list(sys.argv),
        "processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "mixed_precision": mixed_precision,
        "user_dataset": data,
    }


def git_state(package_dir: Path) -> dict[str, Any] | None:
    """{'commit': HEAD's hash, 'dirty': whether tracked files differ from it} of the git checkout that holds
    `package_dir` (vqtok's source), or None when vqtok is not run from one (an installed wheel, no git): the
    package's own __init__.py must be tracked, so a virtual environment inside some other repository does not
    count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                                  timeout=20, env=env, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


def write_run_info(out: Path, record: dict[str, Any], *, resumed: bool) -> None:
    """Start out/run_info.json with `record` or, when resuming, append it to the records there (written atomically).
    An unreadable file met on resume is kept, renamed to run_info.json.unreadable, and a new list begun."""
    path = out / RUN_INFO
    runs: list[Any] = []
    if resumed and path.is_file():
        try:
            runs = json.loads(path.read_text())["runs"]
            if not isinstance(runs, list):
                raise TypeError("runs is not a list")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            aside = path.with_name(f"{RUN_INFO}.unreadable")
            if aside.exists():
                print(f"warning: {path} is unreadable ({type(e).__name__}: {e}) and {aside} exists: this start is "
                      "not recorded", file=sys.stderr)
                return
            os.replace(path, aside)
            print(f"warning: {path} was unreadable ({type(e).__name__}: {e}); kept as {aside}", file=sys.stderr)
            runs = []
    write_text_atomically(path, json.dumps({"runs": [*runs, record]}, indent=2) + "\n")
