"""Writing without losing anything: a crash in the middle of a write leaves the previous contents in place.

`atomic_directory(path)` hands out a fresh temporary directory next to `path` (so on the same file system); when the
block finishes, every file in it is flushed to disk and it takes `path`'s place in a single rename. Until that rename,
`path` holds exactly what it held before, whatever happens to the writer (an exception, `SIGKILL`, a power cut): nothing
half-written is ever at `path`. Files already in `path` that the new write does not produce are kept (hard-linked into
the new directory). A writer killed mid-write leaves a `.<name>.tmp-*` directory next to `path`; it is safe to delete.

`atomic_save_pretrained` saves a PEFT model that way and refuses NaN or infinite adapter weights; `atomic_file` does the
same for one file (tables, JSON, figures). The project's calibration, examples and benchmarks write through these.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_save_pretrained(model, save_directory: PathLike, **kwargs) -> None:
    """`model.save_pretrained(save_directory, **kwargs)`, atomically, after checking that the adapter weights are finite.

    Raises:
        ValueError: an adapter to be saved holds NaN/inf or weights that were never loaded (meta device); nothing is
            written and `save_directory` is left as it was.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if not kwargs.get("is_main_process", True):
        return  # only the main process writes; others must not race it with copies of the old contents
    if isinstance(model, PeftModel):
        for adapter_name in kwargs.get("selected_adapters") or list(model.peft_config):
            state_dict = get_peft_model_state_dict(
                model, state_dict=kwargs.get("state_dict"), adapter_name=adapter_name
            )
            _check_savable(state_dict, adapter_name, save_directory)
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(str(tmp), **kwargs)


def _check_savable(state_dict: dict[str, torch.Tensor], adapter_name: str, save_directory: PathLike) -> None:
    meta = [key for key, tensor in state_dict.items() if tensor.is_meta]
    if meta:
        raise ValueError(
            f"Adapter {adapter_name!r} has weights that were never loaded (on the meta device: {', '.join(meta[:3])}); "
            f"load or initialise them before saving. {str(save_directory)!r} was left as it was."
        )
    bad = [key for key, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(
            f"Adapter {adapter_name!r} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}), so "
            f"it was not saved and {str(save_directory)!r} was left as it was. Training diverged: resume from the last "
            f"good checkpoint with a lower learning rate or gradient clipping, and check the data for NaN/inf."
        )


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` in one rename when the block succeeds.

    If the block raises, the temporary directory is removed and `path` is untouched.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; pass a directory (or a path that does not exist yet).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.is_dir():
            _carry_over(path, tmp)
        _fsync_tree(tmp)
        _replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished write, or the previous contents after a swap


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", **open_kwargs):
    """`open(path, mode)` whose contents appear at `path` only when the block succeeds (write modes only)."""
    if not any(flag in mode for flag in "wx"):
        raise ValueError(f"`atomic_file` writes a new file; use mode 'w' or 'wb', got {mode!r}.")
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with open(fd, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into `new` every entry of `old` that the new write did not produce."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: PathLike, target: PathLike) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (directories last, so that their entries are durable)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(directory) / name
            if not file.is_symlink():
                _fsync(file)
        _fsync(Path(directory))


def _replace_directory(new: Path, path: Path) -> None:
    """Put directory `new` at `path`; what was at `path` ends up at `new` or is deleted."""
    if not path.exists():
        os.rename(new, path)
    elif not _exchange(new, path):  # after an exchange, `new` holds the previous contents (deleted by the caller)
        # No atomic exchange on this system: two renames, the previous contents kept aside until the second is done.
        old = new.with_name(new.name.replace(".tmp-", ".old-", 1))
        os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old)
    _fsync(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Optional[object] = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
        except (OSError, TypeError):  # no C library to ask (Windows)
            _renameat2 = False
    if not _renameat2:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(b))
