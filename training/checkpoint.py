"""Checkpoints and final models of a training run.

`checkpoint/` holds the model (save_pretrained), the resolved config.yaml and the trainer state
(optimizer, scheduler, grad scaler, RNG states, data cursor). It is written beside its place and
swapped in by renames, so a crash leaves the previous checkpoint whole. The final model is
moved into the run's folder with config.json last: its presence marks the run finished.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from safetensors import SafetensorError

from configs import Config, UserError, flatten
from storage.paths import file_problem, make_folder
from training.device import barrier
from training.model_card import CARD

STATE_FILE = "trainer_state.pt"
LOCK_FILE = ".lock"


FIXED_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "batch_size", "grad_accum",
              "seed")
"""Settings no resume may change: the model's and the optimizer's shapes, and the data order the
checkpoint's cursor points into (as do every `data.` and `tokenizer.` setting)."""
NEUTRAL_KEYS = ("device", "eval_every", "checkpoint_every", "save_at_words",
                "resume_with_new_settings", "run",
                "sweep_alphas", "sweep_temperatures", "sweep_ks", "sweep_weights", "splits",
                "batch_size")
"""Settings that do not change what a checkpoint continues (where to run, how often to log or
save, the sweep's grid, the logits job's own batch); `batch_size` only outside the trained
section."""


class RunBusy(UserError):
    """Another process is training into the same folder."""


class SettingsChanged(UserError):
    """A resume under settings other than the checkpoint's. `changes`: {key: (then, now)}."""

    def __init__(self, message: str, *, changes: dict):
        super().__init__(message)
        self.changes = changes


def save_checkpoint(folder: Path, *, model, cfg: Config, optimizer, scheduler, scaler,
                    cursor, history: list[str], is_writer: bool, world_size: int) -> None:
    """Model (save_pretrained), config.yaml and trainer state into `folder`, atomically: written
    beside it, then swapped in by renames. Only rank 0 writes; every rank waits for it.
    `history`: the lines saying which settings changed at which step (see `changed_settings`)."""
    if is_writer:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with removed_on_failure(tmp):
            unwrap(model).save_pretrained(tmp)
            cfg.save(tmp, notes=tuple(history))
            state = io.BytesIO()  # serialised in memory: a file write fails as an OSError
            torch.save({"cursor": vars(cursor), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "rng": rng_states(), "history": list(history)}, state)
            (tmp / STATE_FILE).write_bytes(state.getvalue())
        swap_in(tmp, folder)
    barrier(world_size)


def swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the finished folder `tmp`: the old one is renamed aside first and
    removed last, so a crash between the renames leaves a whole one (`<folder>.old`)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint (`.old` if a crash came between the two renames)."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    if (folder / STATE_FILE).exists() or (folder / STATE_FILE).is_symlink():
        raise UserError(f"{folder / STATE_FILE} is not a regular file: restore it, or delete "
                        f"{folder} to start over")
    return None


def restore(folder: Path, *, model, optimizer, scheduler, scaler, device) -> dict:
    """Load weights and trainer state from a checkpoint folder; returns the saved state
    (`cursor`, `history` of settings changed on resume)."""
    from safetensors.torch import load_file

    state = _load_state(folder)
    weights = folder / "model.safetensors"
    try:
        if weights.is_file():
            unwrap(model).load_state_dict(load_file(weights, device=str(device)), strict=False)
        else:  # a PEFT model saves only its adapter
            from peft import set_peft_model_state_dict
            weights = folder / "adapter_model.safetensors"
            set_peft_model_state_dict(unwrap(model), load_file(weights))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{weights} cannot be loaded ({type(exc).__name__}: missing, truncated "
                        f"or corrupt): restore it, or delete {folder} to start over") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return state


def changed_settings(checkpoint: Path, cfg: Config, *, section: str) -> dict[str, tuple]:
    """{dotted key: (checkpoint's value, cfg's value)} for each setting the checkpoint depends on
    that `cfg` changes: the trained `section` ('student' or 'teacher'), the data and tokenizer,
    and for a student what it distils from (distill, cache)."""
    saved = checkpoint / "config.yaml"
    try:
        if file_problem(saved):  # a pipe would block the read
            raise OSError
        then = flatten(yaml.safe_load(saved.read_text()) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        raise UserError(f"{saved} cannot be read, so the settings the checkpoint was made with "
                        f"are unknown: restore it, or delete {checkpoint.parent} to train "
                        "anew") from None
    now = flatten(json.loads(json.dumps(cfg.to_dict())))  # tuples as lists, as when saved
    sections = (section, "data", "tokenizer") + (("distill", "cache") if section == "student"
                                                  else ())
    changes = {}
    for key in sorted(then.keys() | now.keys()):
        head, _, leaf = key.partition(".")
        if head not in sections or (leaf in NEUTRAL_KEYS and (head != section
                                                               or leaf != "batch_size")):
            continue
        if then.get(key) != now.get(key):
            changes[key] = (then.get(key), now.get(key))
    return changes


def check_resumable(changes: dict[str, tuple], *, checkpoint: Path, step: int, section: str,
                    allowed: bool) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming the keys: always for
    FIXED_KEYS and the data, unless `allowed` (resume_with_new_settings) for the rest."""
    detail = ", ".join(f"{key} {then!r} -> {now!r}" for key, (then, now) in changes.items())
    fixed = [key for key in changes
             if key.split(".")[-1] in FIXED_KEYS or key.startswith(("data.", "tokenizer."))]
    if fixed:
        raise SettingsChanged(
            f"{checkpoint} (step {step}) was made with other settings that a run cannot change "
            f"({detail}): rerun with the checkpoint's settings, or delete {checkpoint.parent} "
            "to train anew", changes=changes)
    if not allowed:
        raise SettingsChanged(
            f"{checkpoint} (step {step}) was made with other settings ({detail}): rerun with "
            f"the checkpoint's settings, or add {section}.resume_with_new_settings=true to "
            f"continue from step {step} under the new ones", changes=changes)


def _load_state(folder: Path) -> dict:
    """The trainer state of a checkpoint, loaded as tensors, numbers and containers only: a
    checkpoint received from elsewhere cannot run code when it is resumed."""
    path = folder / STATE_FILE
    try:
        with open(path, "rb") as stream:  # find_checkpoint saw a regular file: no pipe blocks
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors, numbers and containers, or "
                        "is damaged; refusing to load it (unpickling could run code): delete "
                        f"{folder} to start over") from None
    except (EOFError, RuntimeError, ValueError) as exc:  # torch's errors for a damaged file
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: it is truncated or "
                        f"corrupt): restore it, or delete {folder} to start over") from None


def saved_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (read without restoring anything)."""
    return int(_load_state(checkpoint)["cursor"]["step"])


def rng_states() -> dict:
    """Every RNG's state as tensors, numbers and tuples (what a weights-only load accepts)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                      cached_gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gauss))
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


TOKENIZER_FILE = "tokenizer.json"
MILESTONES_DIR = "checkpoints"


def save_final(model, out_dir: Path, *, tokenizer_dir: Path, card: str) -> None:
    """The complete model folder (`write_model_files`) written into a temporary folder, then its
    files moved into `out_dir`, config.json last: its presence marks the run finished."""
    tmp = out_dir / ".final.tmp"
    write_model_files(model, tmp, tokenizer_dir=tokenizer_dir, card=card)
    files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")
    for file in files:
        file.replace(out_dir / file.name)
    tmp.rmdir()


def save_milestone(model, folder: Path, *, tokenizer_dir: Path, card: str) -> None:
    """A complete model folder at `folder` (e.g. checkpoints/chck_1M), written beside it and
    renamed into place, replacing one an earlier attempt of the same step wrote."""
    make_folder(folder.parent)
    tmp = folder.with_name(folder.name + ".tmp")
    write_model_files(model, tmp, tokenizer_dir=tokenizer_dir, card=card)
    swap_in(tmp, folder)


def write_model_files(model, tmp: Path, *, tokenizer_dir: Path, card: str) -> None:
    """Into the fresh folder `tmp`: save_pretrained (config.json, safetensors weights, or a PEFT
    adapter), generation_config.json, the run's tokenizer files and the model card, so that any
    Hugging Face client loads the folder with nothing added by hand. Removed on any failure."""
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_failure(tmp):
        bare = unwrap(model)
        bare.save_pretrained(tmp)
        if not (tmp / "generation_config.json").is_file() and hasattr(bare, "generation_config"):
            bare.generation_config.save_pretrained(tmp)
        for file in sorted(Path(tokenizer_dir).iterdir()):
            if file.is_file():
                shutil.copyfile(file, tmp / file.name)
        (tmp / CARD).write_text(card)


@contextlib.contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """Writing the temporary folder `tmp`: any failure removes it. A full disk is raised as an
    OSError (ENOSPC) naming `tmp`, which the command line reports as such: safetensors and torch
    raise their own exception types for it, and a plain file write names no file."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, OSError):
            full = exc.errno == errno.ENOSPC
        else:
            full = isinstance(exc, Exception) and _no_space_left(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc
        raise


def _no_space_left(path: Path) -> bool:
    """Whether the filesystem holding `path` has less than a mebibyte left."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return min(stats.f_bavail, stats.f_bfree) * stats.f_frsize < 1 << 20


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """One writer per run folder: an exclusive flock on `out_dir/.lock`, held while training.
    A second process is refused at once (RunBusy) instead of interleaving checkpoints and
    metrics with the first."""
    make_folder(out_dir)
    path = out_dir / LOCK_FILE
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{out_dir} is being trained by another process (it holds {path}): "
                          "wait for it to finish, or stop it and rerun to resume") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_finished(out: Path) -> bool:
    """A complete model folder: config.json (moved into place last), weights and tokenizer. A
    folder of an earlier version without its tokenizer is not: rerunning completes it."""
    return all((out / name).is_file() for name in ("config.json", TOKENIZER_FILE)) and any(
        (out / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def unwrap(model):
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model
