"""A training run's output_dir and its checkpoints, shared by the tokenizer and prior loops.

A fresh run starts in a new or empty output_dir; with `overwrite`, also in the folder of an earlier vqtok run -
recognised by the `.vqtok-run.json` marker every run writes - whose artefacts (RUN_ARTEFACTS) it deletes first. Files
that no vqtok run wrote are never deleted. A checkpoint is written into a staging folder
`checkpoints/step_XXXXXX.tmp-save` and renamed to `step_XXXXXX` when complete; its train_state.json, written last, holds the counters, every file's
size and the hash of the config that matters for resuming (`config.json` beside it holds the config). Resuming
continues from the newest checkpoint that is complete and readable, says which newer ones it skipped and why, and
refuses a checkpoint of another config, naming the keys that differ (only MAY_CHANGE_ON_RESUME may). The random state
restored with a checkpoint is the one the uninterrupted run had at that step: nothing between the restore and the
first step draws from it (the data loader has its own generator). `keep_checkpoints: N` keeps the newest N complete
checkpoints. SIGINT and SIGTERM stop the run after the current step, with a checkpoint (`StopOnSignal`); a second
Ctrl-C stops at once, without one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqtok.config import RunConfig, save_yaml, to_dict
from vqtok.files import staged, write_text_atomically
from vqtok.train.engine import Counters, WeightsEMA, tracker_config
from vqtok.train.run_info import RUN_INFO, run_record, write_run_info


class RunFolderError(ValueError):
    """output_dir or its checkpoints cannot be used as asked; nothing was changed."""


class CheckpointError(OSError):
    """A checkpoint could not be saved (e.g. the disk is full); its partial files were removed."""


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM. `checkpoint`: the checkpoint saved at the stop (None when none was)."""

    def __init__(self, message: str, *, signal_number: int, checkpoint: Path | None):
        super().__init__(message)
        self.signal_number = signal_number
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


RUN_MARKER = ".vqtok-run.json"  # written by a run into its output_dir: {"kind": "tokenizer" | "prior"}
# What a run writes into output_dir, by kind: what overwrite deletes (TensorBoard writes to vqtok/).
RUN_ARTEFACTS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("config.yaml", RUN_INFO, "metrics.jsonl", "final_metrics.json", "samples", "checkpoints", "vqtok",
                  "tokenizer", "discriminator", RUN_MARKER),
    "prior": ("config.yaml", RUN_INFO, "metrics.jsonl", "final_metrics.json", "samples", "checkpoints", "vqtok",
              "prior", RUN_MARKER),
}
# The config keys a resumed run may change: when and what it logs, evaluates and keeps, how it loads data, and where
# its folder lies, which trackers it logs to, the peak its MFU is measured against - none changes the weights it
# trains. Any other difference from the
# checkpoint's config is refused.
MAY_CHANGE_ON_RESUME = frozenset({"output_dir", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                                  "num_workers", "eval_images", "eval_items", "num_samples", "log_with",
                                  "peak_tflops", "tokenizer"})  # a prior's: where the store's tokenizer is, its weights checked
CHECKPOINT_NAME = re.compile(r"step_(\d+)")
STAGING = ".tmp-"  # checkpoints/step_XXXXXX.tmp-save: a checkpoint being written, renamed into place when complete


@dataclass
class Checkpoint:
    """A complete, readable checkpoint folder and its train_state.json."""

    path: Path
    step: int
    state: dict[str, Any]


class RunFolder:
    """One run's output_dir: checked when the run is set up, claimed when it starts, its checkpoints saved and
    restored (see the module docstring). `kind` is 'tokenizer' or 'prior'. `data` describes a user's dataset that
    replaces config.data (None: the config's data): recorded in run_info.json and the checkpoints, and a resume must
    be given the same."""

    def __init__(self, accelerator: Accelerator, config: RunConfig, kind: str, *, resume: bool, overwrite: bool,
                 data: str | None = None):
        if resume and overwrite:
            raise ValueError("resume and overwrite contradict each other: resume continues the run in output_dir, "
                             "overwrite deletes it")
        self.accelerator, self.config, self.kind, self.data = accelerator, config, kind, data
        self.resume, self.overwrite = resume, overwrite
        self.start_step = 0  # the step this start of the run begins at (set by `restore`)
        self.out = Path(config.output_dir)
        self.checkpoints = self.out / "checkpoints"
        self.earlier = self._check_folder()  # the kind of the vqtok run already in output_dir, if any
        self.candidates = self._resume_candidates() if resume else []

    # ---- set-up: nothing is written until `start`

    def _check_folder(self) -> str | None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"output_dir {out} is a file, not a folder")
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if not entries:
            return None
        earlier = read_run_marker(out)
        if self.resume:
            if earlier is None:
                raise RunFolderError(f"cannot resume in {out}: it holds {listing(entries)} but no {RUN_MARKER}, so "
                                     "it is not the folder of a vqtok run")
            if earlier != self.kind:
                raise RunFolderError(f"cannot resume in {out}: it holds a {earlier} run, not a {self.kind} run")
        elif not self.overwrite:
            if earlier is None:
                raise RunFolderError(f"output_dir {out} is not empty (it holds {listing(entries)}): choose another "
                                     "output_dir, or pass --overwrite to write this run beside those files")
            options = "continue it with --resume, replace" if earlier == self.kind else "replace"
            raise RunFolderError(f"output_dir {out} holds an earlier vqtok {earlier} run: {options} it with "
                                 "--overwrite (deletes its checkpoints, metrics, samples and exports), or choose "
                                 "another output_dir")
        elif earlier is None and (ours := [e for e in entries if e in RUN_ARTEFACTS[self.kind]]):
            raise RunFolderError(f"--overwrite: {out} holds {listing(ours)} but no {RUN_MARKER}, so nothing in it is "
                                 "recognisably a vqtok run's and nothing was deleted; remove them yourself or choose "
                                 "another output_dir")
        return earlier

    def _resume_candidates(self) -> list[Checkpoint]:
        """Complete checkpoints, newest first, the newest checked against the config; says what it skipped."""
        complete, skipped = scan_checkpoints(self.checkpoints)
        for path, why in skipped:
            self.accelerator.print(f"skipping {path}: {why}")
        damaged = [(p, why) for p, why in skipped if CHECKPOINT_NAME.fullmatch(p.name)]
        if not complete and damaged:
            path, why = damaged[-1]
            raise RunFolderError(f"cannot resume in {self.out}: none of its checkpoints is complete and readable "
                                 f"({path.name}: {why}{' ...' if len(damaged) > 1 else ''}); start again with "
                                 "--overwrite, or choose another output_dir")
        if complete:
            self._check_config(complete[0])
        return complete

    def _check_config(self, checkpoint: Checkpoint) -> None:
        saved_data = checkpoint.state.get("data")
        if saved_data != self.data:
            given = f"given {self.data}" if self.data else "given none (config.data)"
            trained = f"was trained on a {saved_data}" if saved_data else "was trained on config.data"
            raise RunFolderError(f"cannot resume from {checkpoint.path}: it {trained}, but this run is {given}; "
                                 "resume with the same data (train(config, dataset=...) for a user dataset)")
        if checkpoint.state["config_sha256"] == config_sha256(self.config):
            return
        saved = json.loads((checkpoint.path / "config.json").read_text())
        differ = config_differences(saved, to_dict(self.config)) or ["its config.json does not match its hash"]
        raise RunFolderError(
            f"cannot resume from {checkpoint.path}: it was made with another config ({'; '.join(differ)}); resume "
            f"with the run's own config ({self.out / 'config.yaml'}) - only {', '.join(sorted(MAY_CHANGE_ON_RESUME))} "
            "may change on resume - or start a new run in another output_dir")

    # ---- start: the folder becomes this run's

    def start(self) -> None:
        """Delete the earlier run's artefacts (overwrite), mark output_dir as this run's, write config.yaml - the
        config in force - and run_info.json (a record appended on resume), and start the trackers with the
        hyperparameters."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()  # every process checked the folder before it changes
        if accelerator.is_main_process:
            if self.overwrite and self.earlier is not None:
                self._remove_earlier_run()
            self.out.mkdir(parents=True, exist_ok=True)
            if self.earlier is None or self.overwrite:
                write_text_atomically(self.out / RUN_MARKER, json.dumps({"kind": self.kind}) + "\n")
            with staged(self.out / "config.yaml") as tmp:
                save_yaml(self.config, tmp)
                if self.data:
                    text = Path(tmp).read_text()
                    Path(tmp).write_text(f"# data: a {self.data}, given to train(config, dataset=...); the data "
                                         "section below was not used\n" + text)
            write_run_info(self.out, run_record(accelerator, self.config.mixed_precision, start_step=self.start_step,
                                                data=self.data), resumed=self.resume)
        accelerator.wait_for_everyone()
        extra = {"data": self.data} if self.data else {}
        accelerator.init_trackers("vqtok", config=tracker_config(self.config, **extra))

    def _remove_earlier_run(self) -> None:
        removed = []
        for name in RUN_ARTEFACTS[self.earlier]:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        self.accelerator.print(f"overwrite: removed the earlier {self.earlier} run's {', '.join(removed)} from "
                               f"{self.out}")

    # ---- checkpoints

    def restore(self, ema: WeightsEMA | None) -> tuple[Counters, dict[str, torch.Tensor]]:
        """When resuming, load the newest checkpoint that loads (Accelerate's state, the weights' EMA) and cut
        metrics.jsonl back to it; returns its counters and this process's transient state (zeros and {} when
        there is none, or when not resuming)."""
        if not self.resume:
            return Counters(), {}
        for checkpoint in self.candidates:
            self._check_config(checkpoint)
            try:
                transient = self._load(checkpoint, ema)
            except RunFolderError:
                raise
            except Exception as e:  # complete by its sizes but unreadable: fall back to the next older one
                self.accelerator.print(f"skipping {checkpoint.path}: it does not load ({type(e).__name__}: {e})")
                continue
            self._truncate_metrics(checkpoint.step)
            self.accelerator.print(f"resumed from {checkpoint.path} at step {checkpoint.step}")
            self.start_step = checkpoint.step
            state = checkpoint.state
            return Counters(checkpoint.step, int(state["skipped_total"]), int(state["consecutive_skips"])), transient
        if self.candidates:
            raise RunFolderError(f"cannot resume in {self.out}: none of its checkpoints loads (see above)")
        self.accelerator.print(f"no checkpoint under {self.checkpoints}: starting from step 0")
        self._truncate_metrics(0)
        return Counters(), {}

    def _load(self, checkpoint: Checkpoint, ema: WeightsEMA | None) -> dict[str, torch.Tensor]:
        accelerator, path = self.accelerator, checkpoint.path
        world = int(checkpoint.state["world_size"])
        transient_path = path / f"transient_rank{accelerator.process_index}.safetensors"
        if transient_path.is_file() and world != accelerator.num_processes:
            raise RunFolderError(f"{path} holds per-process state of {world} processes; resume it with the same "
                                 f"number, not {accelerator.num_processes}")
        _check_rng_state(path / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(path))
        if ema is not None:
            saved = load_file(str(path / "weights_ema.safetensors"), device=str(accelerator.device))
            if saved.keys() != ema.shadow.keys():
                raise ValueError(f"{path}: weights_ema.safetensors does not match the model's parameters")
            for name, tensor in saved.items():
                ema.shadow[name].copy_(tensor)
        return load_file(str(transient_path)) if transient_path.is_file() else {}

    def _truncate_metrics(self, step: int) -> None:
        if self.accelerator.is_main_process:
            truncate_metrics(self.out / "metrics.jsonl", step)

    def save(self, counters: Counters, ema: WeightsEMA | None, *,
             transient: dict[str, torch.Tensor] | None = None) -> Path:
        """Accelerate's state (model, optimizer, scheduler, RNGs), the weights' EMA, each process's `transient`
        model state that lives between steps (e.g. the k-means reservoir before initialisation) and the config,
        written into a staging folder that becomes checkpoints/step_XXXXXX once complete, train_state.json last.
        Then the oldest complete checkpoints beyond keep_checkpoints are deleted."""
        accelerator = self.accelerator
        final = self.checkpoints / f"step_{counters.step:06d}"
        staging = final.with_name(f"{final.name}{STAGING}save")
        try:
            if accelerator.is_main_process:
                _remove_staging_folders(self.checkpoints)  # of saves that were killed
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging))
            if transient:
                save_file(transient, str(staging / f"transient_rank{accelerator.process_index}.safetensors"))
            if accelerator.is_main_process:
                if ema is not None:
                    save_file(ema.shadow, str(staging / "weights_ema.safetensors"))
                (staging / "config.json").write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
            accelerator.wait_for_everyone()  # every process's files are in the staging folder
            if accelerator.is_main_process:
                self._commit(staging, final, counters)
        except BaseException as e:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise CheckpointError(self._save_failure(final, e)) from e
            raise
        if accelerator.is_main_process:
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _commit(self, staging: Path, final: Path, counters: Counters) -> None:
        files = {}
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            _fsync(file)
            files[file.relative_to(staging).as_posix()] = file.stat().st_size
        state = {"step": counters.step, "skipped_total": counters.skipped_total,
                 "consecutive_skips": counters.consecutive_skips, "world_size": self.accelerator.num_processes,
                 "config_sha256": config_sha256(self.config), "data": self.data, "files": files}
        write_text_atomically(staging / "train_state.json", json.dumps(state, indent=1) + "\n")
        _fsync_folder(staging)
        if final.exists():  # a damaged checkpoint of this step that the resume skipped: replaced
            old = final.with_name(f"{final.name}{STAGING}replaced")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
        _fsync_folder(self.checkpoints)

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        if keep is not None:
            for checkpoint in scan_checkpoints(self.checkpoints)[0][keep:]:
                shutil.rmtree(checkpoint.path)

    def _save_failure(self, final: Path, error: OSError) -> str:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        what = "the disk is full (no space left on device)" if full else f"{type(error).__name__}: {error}"
        newest = scan_checkpoints(self.checkpoints)[0]
        after = f"the newest complete checkpoint is {newest[0].path}" if newest else "there is no complete checkpoint"
        return (f"could not save checkpoint {final}: {what}; its partial files were removed and {after}"
                f"{'; free space, then continue with --resume' if full else ''}")

    # ---- stopping on a signal

    @contextmanager
    def stoppable(self, counters: Counters) -> Iterator[StopOnSignal]:
        """The training loop's block: SIGINT and SIGTERM ask it to stop after the current step (`StopOnSignal`); an
        interrupt in the middle of a step (a second Ctrl-C) becomes a TrainingInterrupted that says no checkpoint
        was saved for it."""
        with StopOnSignal(self.accelerator) as stop:
            try:
                yield stop
            except KeyboardInterrupt as e:
                if isinstance(e, TrainingInterrupted):
                    raise
                newest = scan_checkpoints(self.checkpoints)[0]
                where = f"the newest is {newest[0].path}; continue with --resume" if newest else "there is none yet"
                raise TrainingInterrupted(
                    f"interrupted during step {counters.step + 1} of {self.config.max_steps}: no checkpoint saved for "
                    f"it ({where})", signal_number=signal.SIGINT, checkpoint=None) from None

    def stopped(self, signal_number: int, checkpoint: Path, step: int) -> TrainingInterrupted:
        """The exception that ends a run stopped by a signal after saving `checkpoint`."""
        self.accelerator.end_training()
        return TrainingInterrupted(f"stopped by {signal.Signals(signal_number).name} after step {step} of "
                                   f"{self.config.max_steps}: saved {checkpoint}; continue with --resume",
                                   signal_number=signal_number, checkpoint=checkpoint)


class StopOnSignal:
    """Inside the block, SIGINT and SIGTERM set `received` instead of ending the process, so the loop can stop at
    the end of a step with a checkpoint; a second SIGINT raises KeyboardInterrupt at once. (Handlers can only be
    installed in the main thread; elsewhere signals keep their defaults.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        if self.received is not None:
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = number
        print(f"\n{signal.Signals(number).name}: stopping after this step, with a checkpoint (Ctrl-C again stops at "
              "once, without one)", file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        """The signal that stops the run, the same on every process (the largest number any received); a
        collective call: every process calls it once per step."""
        received = torch.tensor([self.received or 0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
        return int(received) or None


# ---- reading checkpoints and run folders


def read_run_marker(out: Path) -> str | None:
    """The kind of vqtok run that `out` holds, from its marker (None: not a vqtok run folder)."""
    path = out / RUN_MARKER
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text()).get("kind")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        kind = None
    if kind not in RUN_ARTEFACTS:
        raise RunFolderError(f"{path} is not a vqtok run marker (expected {{\"kind\": \"tokenizer\" or \"prior\"}})")
    return kind


def scan_checkpoints(folder: Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """The complete and readable checkpoints under `folder`, newest first, and the step_* entries skipped with the
    reason: unfinished saves (staging folders), names that are not step_NUMBER, and damaged checkpoints."""
    complete: list[Checkpoint] = []
    skipped: list[tuple[Path, str]] = []
    entries = sorted(p for p in folder.iterdir() if p.name.startswith("step_")) if folder.is_dir() else []
    for path in entries:
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if STAGING in path.name:
            skipped.append((path, "an unfinished save"))
        elif not match:
            skipped.append((path, "not a checkpoint name (step_ and a number)"))
        elif isinstance(found := inspect_checkpoint(path, int(match[1])), str):
            skipped.append((path, found))
        else:
            complete.append(found)
    complete.sort(key=lambda c: c.step, reverse=True)
    return complete, skipped


def inspect_checkpoint(path: Path, step: int) -> Checkpoint | str:
    """The checkpoint at `path` if it is complete and readable, else why not: train_state.json (written last) must
    parse and list every file with its size, the files must be there at those sizes, safetensors headers must
    parse, and the files that Accelerate would silently do without (each process's RNG state) must be listed."""
    state_file = path / "train_state.json"
    if not state_file.is_file():
        return "no train_state.json (an incomplete save)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"train_state.json is {'empty' if state_file.stat().st_size == 0 else f'unreadable ({e})'}"
    fields = {"step": int, "skipped_total": int, "consecutive_skips": int, "world_size": int, "config_sha256": str,
              "files": dict}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in fields.items()):
        return ("train_state.json lacks the counters, file list or config hash (a damaged file, or a checkpoint of "
                "a vqtok that did not record them)")
    if state["step"] != step:
        return f"train_state.json is for step {state['step']}"
    needed = {"model.safetensors", "config.json", *(f"random_states_{i}.pkl" for i in range(state["world_size"]))}
    if missing := sorted(needed - state["files"].keys()):
        return f"{', '.join(missing)} not in its file list"
    for name, size in state["files"].items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(size, int):
            return f"train_state.json lists {name!r}: not a file of the checkpoint"
        if not file.is_file():
            return f"{name} is missing"
        if (actual := file.stat().st_size) != size:
            return f"{name} is {actual:,} bytes, {size:,} when saved (truncated or changed)"
        if name.endswith(".safetensors") and not _readable_safetensors(file):
            return f"{name} is not a readable safetensors file"
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "config.json is unreadable"
    return Checkpoint(path, step, state)


def _readable_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception:  # safetensors raises its own error type for any malformed header
        return False
    return True


def config_sha256(config: RunConfig) -> str:
    """Hash of the config that matters for resuming: every key but MAY_CHANGE_ON_RESUME."""
    kept = {k: v for k, v in to_dict(config).items() if k not in MAY_CHANGE_ON_RESUME}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every dotted key that differs, but MAY_CHANGE_ON_RESUME."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in a.keys() | b.keys()
                  if k not in MAY_CHANGE_ON_RESUME and a.get(k, _ABSENT) != b.get(k, _ABSENT))
    return [f"{k}: {a.get(k, _ABSENT)!r} -> {b.get(k, _ABSENT)!r}" for k in keys]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint being resumed, so the file reads as one run; a last line cut
    short by a kill is dropped too, any other unreadable line is an error naming it."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            line_step = record["step"]
        except (ValueError, TypeError, KeyError):
            if number == len(lines):
                break
            raise RunFolderError(f"{path}: line {number} is not a metrics record: {line[:80]!r}") from None
        if line_step <= step:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _check_rng_state(path: Path) -> None:
    """Read this process's RNG state as Accelerate will (torch.load with weights_only=True: a crafted file runs no
    code) and raise if it cannot be read. Accelerate itself only logs such a failure and goes on with the current
    random state, so the resumed run would silently differ from an uninterrupted one."""
    from accelerate.utils import load

    load(path)


def _remove_staging_folders(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith("step_") and STAGING in path.name and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX; elsewhere folders cannot be opened)."""
    if os.name == "posix":
        _fsync(path)


def listing(names: list[str], shown: int = 4) -> str:
    """The first `shown` names, and how many more, for messages about a folder's contents."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
