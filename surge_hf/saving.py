"""Writing folders so that an interruption or a full disk never leaves a half-written folder in place of a good one.

- `removed_on_failure(staging, ...)`: a block that writes a temporary folder; if it fails, the folder is removed, and
  a full disk (`OSError` ENOSPC, safetensors' "No space left on device", or torch's "file write failed" with less
  free space than needed) is reported as `DiskFullError`, which names the folder being written, the space it needs
  and the space left.
- `replaced_atomically(target, ...)`: a temporary sibling of `target` that holds a copy of `target`'s files, is
  written by the block and then takes `target`'s place, so `target` is at every moment either the old folder or the
  complete new one (`save_pretrained` of the SURGE models writes through it).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STAGING_SUFFIX = ".saving"
_REPLACED_SUFFIX = ".replaced"


class DiskFullError(OSError):
    """No space left on the device while writing a folder; the message names the folder and the space it needs."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, reports a full disk (ENOSPC, or the "No space left on
    device" of safetensors' `SafetensorError`, which carries no errno)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _failed_for_space(error: BaseException, free: int, needed: Callable[[], int]) -> bool:
    """`is_disk_full(error)`, or a failed write that names no cause (`torch.save` raises "PytorchStreamWriter failed
    writing file ...: file write failed" on a full disk) while less than the space needed is free."""
    return is_disk_full(error) or ("file write failed" in str(error) and free < needed())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes the tensors take when saved."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


@contextmanager
def removed_on_failure(staging: Path, *, what: str, needed_bytes: Callable[[], int], fix: str = "") -> Iterator[Path]:
    """Run the block that writes the temporary folder `staging`; if it raises, remove `staging` and re-raise, as a
    `DiskFullError` when the disk is full.

    Args:
        staging: the temporary folder the block writes.
        what: what is being written, for the message (e.g. "checkpoint out/checkpoints/step_4").
        needed_bytes: called on a full disk only: about how many bytes the write needs.
        fix: how to continue once space is freed (appended to the message).
    """
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        free = _free_bytes(staging)
        if not _failed_for_space(error, free, needed_bytes):
            raise
        raise DiskFullError(
            f"No space left on device while writing {what} (in {staging}, now removed): it needs about "
            f"{_mib(needed_bytes())} free, and {_mib(free)} are free there. Free some space or write to a larger "
            f"disk.{' ' + fix if fix else ''}"
        ) from error


@contextmanager
def replaced_atomically(target: str | Path, *, what: str, needed_bytes: Callable[[], int]) -> Iterator[Path]:
    """Yield a temporary sibling folder of `target` holding a copy of `target`'s files (none when it does not
    exist); when the block succeeds, the sibling takes `target`'s place. If the block raises (or the process is
    killed), `target` is left as it was and the sibling is removed (on the next write at the latest).

    `what` and `needed_bytes` are as in `removed_on_failure`; the copy of `target` counts towards the space needed.
    """
    target = Path(target)
    staging = target.parent / f".{target.name}{_STAGING_SUFFIX}"
    replaced = target.parent / f".{target.name}{_REPLACED_SUFFIX}"
    if replaced.is_dir() and not target.exists():  # killed between the two renames below: put the old folder back
        replaced.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
    with removed_on_failure(staging, what=f"{what} {target}",
                            needed_bytes=lambda: folder_bytes(target) + needed_bytes()):
        if target.is_dir():
            shutil.copytree(target, staging, symlinks=True)
        else:
            staging.mkdir(parents=True)
        yield staging
    if target.exists():
        target.rename(replaced)
    staging.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
