"""An output path that is never half-written: checks before any work, a lock per run, a temporary
directory beside the target and two renames without a signal between them."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptq_fsdp import faults
from gptq_fsdp.distributed import collectives

logger = logging.getLogger("gptq_fsdp")


class OutputDirError(FileExistsError):
    """The output directory exists and is not empty."""


def check_output_dir(output_dir: str | Path, overwrite: bool = False, inputs: dict[str, Path] | None = None) -> Path:
    """Fail before any work if `output_dir` holds something and `overwrite` is off, if its parent
    cannot be written, or if it is, holds or lies inside one of the run's `inputs` (what -> path),
    which an overwrite would destroy. Returns the absolute path."""
    path = Path(output_dir).expanduser().absolute()
    for what, source in (inputs or {}).items():
        source = Path(source).expanduser().resolve()
        resolved = path.resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            relation = "is" if resolved == source else "holds" if source.is_relative_to(resolved) else "lies inside"
            raise OutputDirError(f"the output {path} {relation} the {what} {source}: choose an output outside it")
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputDirError(f"output directory {path} exists and is not empty (pass overwrite / --overwrite)")
    if not path.parent.exists():
        raise FileNotFoundError(f"parent directory of the output {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {path.parent} (the output's parent directory)")
    return path


class OutputLock:
    """An exclusive lock on an output path for one run: a file `.NAME.lock` beside it, held with
    flock (the OS releases it if the process dies). Taking it also proves the parent writable, and
    tidies what a killed earlier run left beside the output: a half-written `.NAME.tmp-*` is removed,
    a checkpoint moved aside as `.NAME.old-*` goes back in place if nothing is at the output."""

    def __init__(self, output_dir: str | Path) -> None:
        self.target = Path(output_dir).expanduser().absolute()
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            raise PermissionError(f"cannot write beside the output {self.target}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputDirError(
                f"another run ({holder}) is writing {self.target}; wait for it or pick another output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        self._tidy()

    def _tidy(self) -> None:
        parent, name = self.target.parent, self.target.name
        for old in sorted(parent.glob(f".{name}.old-*")):
            if not self.target.exists():
                old.rename(self.target)
                logger.warning("%s: put back the checkpoint an interrupted save had moved aside (%s)", self.target, old)
            else:
                remove(old)
                logger.warning("removed %s, a checkpoint an interrupted save had already replaced", old)
        for tmp in sorted(parent.glob(f".{name}.tmp-*")):
            remove(tmp)
            logger.warning("removed %s, left half-written by an interrupted run", tmp)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block take effect right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        s: signal.signal(s, lambda number, frame: caught.append(number)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def shared_tmp_dir(target: Path) -> Path:
    """A fresh directory beside `target`, made by rank 0 and named to all ranks (shared filesystem)."""
    path = str(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)) if collectives.rank() == 0 else None
    return Path(collectives.broadcast_object(path))


def move_into_place(tmp: Path, target: Path) -> None:
    """Two renames with no signal between them: the old checkpoint or the new one is at `target`
    at every moment (a kill -9 between them leaves `.NAME.old-*`, which OutputLock puts back)."""
    os.chmod(tmp, 0o755)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    with signals_deferred():
        if not target.exists():
            tmp.rename(target)
            return
        target.rename(old)
        faults.between_renames()
        try:
            tmp.rename(target)
        except OSError:
            old.rename(target)  # keep the previous checkpoint rather than nothing
            raise
        remove(old)
