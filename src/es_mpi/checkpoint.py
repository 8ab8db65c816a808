"""Master-weight checkpoints: safetensors, streamed (tensorfile.py), written atomically,
newest few kept."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from . import tensorfile

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^iter_(\d{8})\.safetensors$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temp file, fsync, then os.replace: a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    tensorfile.write(tmp, tensors, metadata)  # fsynced
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_path(run_dir: Path, iterations_done: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"iter_{iterations_done:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(iterations done, path) of every complete checkpoint, oldest first."""
    folder = run_dir / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            m = _NAME.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(
    run_dir: Path, iterations_done: int, master: dict[str, torch.Tensor], checksum: str, keep: int
) -> Path:
    path = checkpoint_path(run_dir, iterations_done)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(master, path, {"iterations_done": str(iterations_done), "checksum": checksum})
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an older `dst` is removed only afterwards."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)
