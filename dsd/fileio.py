"""Writing files so that a failure or a race never leaves a half-written file or loses an earlier one.

- :func:`atomic_path`: one file, written to a temporary beside it and renamed into place when complete.
- :class:`OutputSet`: all the files of one run, staged as temporaries and moved into place together only
  when the run has succeeded; without ``force`` no existing file is replaced, not even one that another
  run created meanwhile (the final name is claimed exclusively, so of two concurrent runs exactly one wins).
- :func:`remove_stale_temporaries`: temporaries whose run died (``kill -9``) are cleaned up by the next run.
- :func:`dsd_cache_dir`: where dsd keeps what it can make again (trained built-in weights, layer timings).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Union

from .errors import DsdError

__all__ = ["atomic_path", "atomic_write_text", "OutputSet", "make_dirs", "remove_empty_dirs", "remove_stale_temporaries",
           "TEMP_SUFFIX", "dsd_cache_dir"]

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".dsd-tmp"


def dsd_cache_dir() -> Path:
    """``$DSD_CACHE``, else ``~/.cache/dsd``."""
    return Path(os.environ.get("DSD_CACHE", Path.home() / ".cache" / "dsd"))


def _temporary(path: Path) -> Path:
    """A new, empty temporary beside ``path`` whose name carries this process's id (for stale clean-up)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return tmp
        except FileExistsError:
            continue


def _publish_mode(tmp: Path) -> None:
    """Temporaries are private (0600); the result should look like any new file."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, someone else's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete dsd temporaries in ``directory`` left by processes that no longer run; return them."""
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        parts = tmp.name[:-len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _claim(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` only if ``final`` does not exist, atomically (a hard link refuses a taken name)."""
    try:
        os.link(tmp, final)
    except OSError as error:  # a file system without hard links: exclusive create, then replace
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.replace(tmp, final)
        return
    tmp.unlink()


def make_dirs(directory: Path) -> List[Path]:
    """``mkdir -p``; returns the directories it created, outermost first (for :func:`remove_empty_dirs`)."""
    missing = [d for d in [directory, *directory.parents] if not d.exists()]
    for d in reversed(missing):
        d.mkdir()
    return missing[::-1]


def remove_empty_dirs(made: Sequence[Path]) -> None:
    """Remove the directories :func:`make_dirs` created, innermost first, where they are still empty."""
    for directory in reversed(made):
        with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
            directory.rmdir()


class OutputSet:
    """The output files of one run: write each to ``path(final)``, then :meth:`commit` moves all into place.

    Used as a context manager, an exception discards every temporary and leaves earlier files as they were.
    Files are committed in the order given (put the file that names the others last).
    """

    def __init__(self, paths: Iterable[PathLike], force: bool = False):
        self.finals = [Path(p) for p in paths]
        self.force = force
        self._temps: Dict[Path, Path] = {}
        self._made: List[Path] = []  # directories this run created (removed again if it fails)

    def path(self, final: PathLike) -> Path:
        final = Path(final)
        if final not in self.finals:
            raise ValueError(f"{final} is not one of this run's outputs")
        if final not in self._temps:
            self._make_parents(final.parent)
            self._temps[final] = _temporary(final)
        return self._temps[final]

    def _make_parents(self, directory: Path) -> None:
        self._made += make_dirs(directory)

    def commit(self) -> List[Path]:
        """Move every written file into place; without ``force``, refuse (and undo) if any name was taken."""
        placed: List[Path] = []
        try:
            for final in self.finals:
                tmp = self._temps.get(final)
                if tmp is None:  # not written by this run (an optional output)
                    continue
                _publish_mode(tmp)
                if self.force:
                    os.replace(tmp, final)
                else:
                    _claim(tmp, final)
                del self._temps[final]
                placed.append(final)
        except FileExistsError:
            for path in placed:
                path.unlink(missing_ok=True)
            self.discard()
            raise DsdError(f"{final} was created by someone else while this run worked (another dsd run?); "
                           "this run kept nothing: pass --force to overwrite, or choose another output") from None
        return placed

    def discard(self) -> None:
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)
        self._temps.clear()
        remove_empty_dirs(self._made)
        self._made.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()
