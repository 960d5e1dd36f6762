"""Checkpoints and final models of a training run.

`checkpoint/` holds the model (save_pretrained), the resolved config.yaml and the trainer state
(optimizer, scheduler, grad scaler, RNG states, data cursor). It is written beside its place and
swapped in by renames, so a crash leaves the previous checkpoint whole. The final model is
moved into the run's folder with config.json last: its presence marks the run finished.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from configs import Config
from training.device import barrier

STATE_FILE = "trainer_state.pt"


def save_checkpoint(folder: Path, *, model, cfg: Config, optimizer, scheduler, scaler,
                    cursor, is_writer: bool, world_size: int) -> None:
    """Model (save_pretrained), config.yaml and trainer state into `folder`, atomically: written
    beside it, then swapped in by renames. Only rank 0 writes; every rank waits for it."""
    if is_writer:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp)
        cfg.save(tmp)
        torch.save({"cursor": vars(cursor), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_states()}, tmp / STATE_FILE)
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier(world_size)


def find_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint (`.old` if a crash came between the two renames)."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def restore(folder: Path, *, model, optimizer, scheduler, scaler, device) -> dict:
    """Load weights and trainer state from a checkpoint folder; returns the saved cursor."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if weights.is_file():
        unwrap(model).load_state_dict(load_file(weights, device=str(device)), strict=False)
    else:  # a PEFT model saves only its adapter
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(unwrap(model), load_file(folder / "adapter_model.safetensors"))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return state["cursor"]


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_final(model, out_dir: Path) -> None:
    """save_pretrained into a temporary folder, then move the files in, config.json last
    (its presence with the weights marks the student as finished)."""
    tmp = out_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")
    for file in files:
        file.replace(out_dir / file.name)
    tmp.rmdir()


def is_finished(out: Path) -> bool:
    """A final model was saved (config.json is moved into place last)."""
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def unwrap(model):
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model
