"""One run per run directory: rank 0 holds an exclusive lock on RUN_DIR/run.lock for the life of the run.

Two runs on one directory (a job submitted twice, a debug run left in another terminal) would write the same
checkpoint tags, `latest` and metrics.jsonl, and each would resume from the other's half-written state. The lock is
a POSIX record lock (fcntl.lockf): held by the process, not by the data-loader workers it forks, and dropped by the
kernel when the process ends in any way (kill -9, a node's time limit), so a crashed or requeued run never finds a
stale one on a local file system. NFS carries it to other machines; there the lock of a node that crashed outright
lives until the server's lease runs out (about 90 s with NFSv4), and a run started meanwhile is refused with the
dead holder's name. A file system without locks gets a warning, not a refusal.

    lock = RunLock.acquire(run_dir)      # UserError naming the holder when another run has it
    ...
    lock.release()                       # a run that wrote nothing leaves no directory behind

A run that fails before writing anything (a wrong checkpoint, a bad weights file) removes the lock file and the
directory it created, so the failed command leaves the disk as it found it. The lock file may thus be unlinked by
its holder; a process that locked a file no longer at the path tries again.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import UserError
from .log import log

LOCK_NAME = "run.lock"


def _holder_text() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f", SLURM job {job}" if job else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class RunLock:
    def __init__(self, run_dir: Path, fd: int | None, created_dir: bool) -> None:
        self.run_dir, self.fd, self.created_dir = run_dir, fd, created_dir

    @classmethod
    def acquire(cls, run_dir: Path, hint: str = "wait for it to end, or give this one another run.name") -> "RunLock":
        path = run_dir / LOCK_NAME
        while True:
            created_dir = not run_dir.is_dir()
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory went away with a failed run's cleanup: again
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
                    os.close(fd)
                    raise UserError(f"run directory {run_dir} is in use by another run ({holder}); {hint}") from None
                os.close(fd)
                log(f"WARNING: cannot lock {path} ({e.strerror}): make sure no other run uses {run_dir}")
                return cls(run_dir, None, False)
            if _same_file(fd, path):
                break
            os.close(fd)  # locked a file its holder unlinked on leaving: take the one at the path now
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
        return cls(run_dir, fd, created_dir)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                (self.run_dir / LOCK_NAME).unlink()  # still holding the lock: nobody can have taken it meanwhile
                self.run_dir.rmdir()
        except OSError:
            pass  # another run is starting in the directory (it found our lock, or creates its own): leave it be
        finally:
            os.close(self.fd)  # the process's last descriptor of the file: the lock goes with it
            self.fd = None
