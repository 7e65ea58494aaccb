"""Atomic publication of an output directory: at every instant ``OUT`` is the old complete
directory or the new complete one, never neither, never half of either.

* The new directory is written as ``.OUT.tmp-PID-XXXX`` beside ``OUT`` and published with one
  ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; the old directory then sits under the temporary name
  and is removed). Where the kernel or filesystem lacks it, two renames are done with termination
  signals held back between them, so only a power loss can fall between them; the next run then
  finds ``.OUT.old-PID`` and the new ``OUT``.
* A lock beside ``OUT`` (``.OUT.lock``, ``flock``) makes a second run into the same ``OUT`` fail at
  once with a clear error instead of racing.
* SIGTERM and SIGHUP clean up like SIGINT (the temporary directory is removed). Temporaries left by
  a process that died without cleaning up (SIGKILL, power loss) are recognised by their name and
  dead PID and removed by the next run in that parent directory.
* ``OUT`` gets the permissions of a normal new directory under the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from loramerge.errors import AdapterNotFoundError, LoraMergeError, OutputWriteError

__all__ = ["OutputBusyError", "atomic_directory", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

MARKER = ".loramerge-temporary"  # inside every temporary directory, so that only ours are ever removed
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class OutputBusyError(LoraMergeError, BlockingIOError):
    """Another process is writing the same output directory right now."""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path) -> list[str]:
    """Remove ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` directories in ``parent`` whose process is gone.

    Returns:
        The names removed.
    """
    removed: list[str] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or _alive(int(match["pid"])) or entry.is_symlink() or not entry.is_dir():
            continue
        if not (entry / MARKER).is_file():  # not one of loramerge's: never touch another tool's directory
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
        logger.info("removed %s, left behind by process %s", entry, match["pid"])
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2``); ``False`` when not available here."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    func: Any = getattr(libc, "renameat2", None)
    if func is None:
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = func(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _terminations_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like SIGINT (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Within the block, termination signals are recorded instead of acted on (main thread only):
    the few steps that publish a finished output run to the end."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in _TERMINATING}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _lock(final: Path) -> tuple[int, Path]:
    """Take the lock beside ``final`` (``.NAME.lock``, removed again on release); refuse at once when held."""
    lock = final.with_name(f".{final.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputWriteError(
                f"cannot create the lock file {str(lock)!r} beside the output ({e.strerror})."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise OutputBusyError(
                f"another loramerge process (pid {owner}) is writing {str(final)!r} right now; wait for it to finish, "
                "or choose another output directory."
            ) from e
        try:  # the holder before us may have removed the file after we opened it: lock the one on disk
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, lock


def _unlock(fd: int, lock: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(lock)
    os.close(fd)


def _prepare_parent(parent: Path) -> None:
    if parent.exists() and not parent.is_dir():
        raise OutputWriteError(
            f"the output's parent {str(parent)!r} is a file, not a directory; choose another output."
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create the output's parent directory {str(parent)!r} ({e.strerror}).") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(
            f"the output's parent directory {str(parent)!r} is not writable (read-only filesystem or no permission); "
            "choose another output."
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary directory beside ``target``, publish it on success.

    On any exception, SIGINT, SIGTERM or SIGHUP the temporary directory is removed and ``target`` is
    left as it was. An existing ``target`` is refused unless ``overwrite`` is true; it is then
    replaced in one atomic exchange once the new one is complete (see the module docstring).

    Raises:
        LoraMergeError: ``target`` exists and ``overwrite`` is false.
        OutputBusyError: Another process holds the lock of ``target``.
        OutputWriteError: The parent is a file, not writable, or the publication failed.
    """
    final = Path(target)
    _prepare_parent(final.parent)
    fd, lock = _lock(final)
    try:
        remove_stale_temporaries(final.parent)
        if (final.exists() or final.is_symlink()) and not overwrite:
            raise LoraMergeError(
                f"{str(final)!r} already exists; choose another output path or pass overwrite=True "
                "(--overwrite on the command line)."
            )
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise OutputWriteError(
                f"{str(final)!r} exists and is not a directory; loramerge replaces directories only."
            )
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
            os.chmod(tmp, 0o777 & ~_umask())
            (tmp / MARKER).write_bytes(b"")
        except OSError as e:
            raise OutputWriteError(f"cannot create a directory beside {str(final)!r} ({e.strerror}).") from e
        try:
            with _terminations_raise():
                yield tmp
            with _signals_held() as received:
                _publish(tmp, final)
            if received:
                logger.warning(
                    "signal %s arrived while %s was being published; the output is complete",
                    ", ".join(signal.Signals(s).name for s in received),
                    final,
                )
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, LoraMergeError):
                raise
            raise _os_error(e, tmp, final) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _unlock(fd, lock)


def _os_error(error: OSError, tmp: Path, final: Path) -> LoraMergeError:
    """A raw ``OSError`` from inside the block, as loramerge's error: the output, or an input, named."""
    name = str(error.filename) if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) or name.startswith(str(tmp)):
        shown = name.replace(str(tmp), str(final)) if name else str(final)
        return OutputWriteError(
            f"writing {shown!r} failed ({reason}); nothing was left behind and any previous output is unchanged. "
            "Free space or choose another output."
        )
    if error.errno == errno.ENOENT:
        return AdapterNotFoundError(
            f"{name or 'an input file'!r} disappeared while it was being read ({reason}); nothing was written. "
            "Do not change the inputs during a merge."
        )
    return OutputWriteError(f"{name or str(final)!r}: {reason}; nothing was written.")


def _publish(tmp: Path, final: Path) -> None:
    with contextlib.suppress(OSError):
        (tmp / MARKER).unlink()  # the published directory is no temporary
    try:
        if not final.exists():
            os.rename(tmp, final)
            return
        if _exchange(tmp, final):  # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
            return
        logger.info("renameat2(RENAME_EXCHANGE) is not available here; replacing %s with two renames", final)
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, backup)
        with contextlib.suppress(OSError):
            (backup / MARKER).write_bytes(b"")  # removable by a later run if this one dies now
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(backup, final)  # put the old one back
            with contextlib.suppress(OSError):
                (final / MARKER).unlink()
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except OSError as e:
        raise OutputWriteError(
            f"publishing {str(final)!r} failed ({e.strerror}); the previous output is unchanged."
        ) from e
