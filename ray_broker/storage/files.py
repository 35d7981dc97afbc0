"""Small durable-file helpers: atomic replace, directory fsync, integer checkpoints."""
from __future__ import annotations

import os


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: write tmp, fsync, rename, fsync dir."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_int(path: str, value: int) -> None:
    atomic_write(path, f"{int(value)}\n".encode())


def read_int(path: str, default: int) -> int:
    """The integer in a checkpoint file, or `default` if the file is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return default


def remove_if_exists(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
