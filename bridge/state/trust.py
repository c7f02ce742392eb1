"""Whether the state database can be trusted: who could have written it.

The state database is root's word to itself: its spawn ledger names the
process groups root signals at start and the output files it removes, its
sessions and tokens who is logged on. Whoever can replace the file, or the
directory it is in (or rename a directory above it), can make root kill
and delete what they choose. So the state directory, the database's files
and a backup about to be restored must be writable by no one but root and
the bridge's own user, as ``lock_dir`` must (bridge.endpoints).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bridge.endpoints import StartupError

#: The database's own files in the state directory (SQLite's WAL mode).
DATABASE_FILES = ("state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm")


def _trusted_owner(info: os.stat_result) -> bool:
    return info.st_uid in (0, os.geteuid())


def _describe(path: Path, info: os.stat_result) -> str:
    return f"{path} (uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})"


def ancestors_problem(path: Path) -> str | None:
    """What lets another user replace ``path`` through a directory above
    it: one they own, or one they may write to without the sticky bit (in
    a sticky directory such as /tmp only an entry's owner renames it).
    None when there is nothing. Follows symlinks above ``path`` to the
    directories they name (those are what the kernel walks)."""
    parent = Path(os.path.realpath(path.parent))
    for directory in (parent, *parent.parents):
        try:
            info = directory.stat()
        except OSError as e:
            return f"{directory} cannot be looked at ({e.strerror or e})"
        sticky = info.st_mode & stat.S_ISVTX
        if not _trusted_owner(info) or (info.st_mode & 0o022 and not sticky):
            return (f"the directory {_describe(directory, info)} above it may be written by "
                    f"others, who could put another in its place")
    return None


def state_dir_problem(directory: Path) -> str | None:
    """What is wrong with ``directory`` as the state directory (None: it is
    sound, or it does not exist yet and would be made 0700 under sound
    directories)."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        return ancestors_problem(existing / "x") if existing != directory else None
    except OSError as e:
        return f"{directory} cannot be looked at ({e.strerror or e})"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory (a symlink or a file); make it a directory"
    if not _trusted_owner(info) or info.st_mode & 0o022:
        return (f"directory {_describe(directory, info)} may be written by others, who could "
                f"replace the state database (it names the processes root signals and the "
                f"files it removes); make it root's and chmod 700")
    for name in DATABASE_FILES:
        problem = file_problem(directory / name, missing_ok=True)
        if problem is not None:
            return problem
    problem = ancestors_problem(directory)
    return None if problem is None else f"{directory}: {problem}"


def file_problem(path: Path, missing_ok: bool = False) -> str | None:
    """What is wrong with ``path`` as a state database file: a symlink, not
    a regular file, another user's, or writable by group or others."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None if missing_ok else f"{path} does not exist"
    except OSError as e:
        return f"{path} cannot be looked at ({e.strerror or e})"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (a symlink, a directory, ...)"
    if not _trusted_owner(info) or info.st_mode & 0o022:
        return (f"{_describe(path, info)} may be written by others, who could have put "
                f"anything in it; make it root's and chmod 600")
    return None


def backup_problem(backup_file: Path) -> str | None:
    """Why ``backup_file`` must not be restored (None: it may be): another
    user could have written it, or swapped it for theirs in its directory."""
    problem = file_problem(backup_file)
    if problem is None:
        problem = ancestors_problem(backup_file)
    return problem


def check_state_dir(directory: Path) -> None:
    """Make the state directory (0700), or refuse one others could write
    to. Raises StartupError."""
    try:
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is cut by the umask
    except FileExistsError:
        pass
    except OSError as e:
        raise StartupError(f"state_dir: cannot create directory {directory}: "
                           f"{e.strerror or e}") from None
    problem = state_dir_problem(directory)
    if problem is not None:
        raise StartupError(f"state_dir: {problem}")
