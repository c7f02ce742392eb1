"""Whether only root and the bridge's user can change a file the bridge
trusts with root's power: its TOML file and ogon's config.ini (they name
the commands run as root, ``LD_PRELOAD`` among them), the users file (it
hands out FULL tokens) and the module programs run as root (review
finding 14).

Such a file must belong to root or the bridge's user and not be writable
by its group or others; every directory above it must belong to root or
the bridge's user too (a directory's owner can swap what it holds) and not
be writable by others or by its group unless it is sticky (in ``/tmp``,
1777, others may add names but not replace a file that is not theirs; a
group of root's own, ``root`` or Debian's ``staff``, may write). Symbolic links are
followed, and the directories above both the path given and the file it
leads to are checked.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

#: What each kind of file hands whoever can change it.
CONSEQUENCES = {
    "configuration file": "it names the commands the bridge runs as root",
    "ogon's config.ini": "it names the commands the bridge runs as root",
    "users file": "it hands out logons with FULL rights",
    "module program": "the bridge runs it as root",
}


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _directories(path: Path) -> list[Path]:
    """The directories above ``path`` as given and above where it leads,
    nearest first, each once."""
    seen: list[Path] = []
    for start in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for directory in start.parents:
            if directory not in seen:
                seen.append(directory)
    return seen


def untrusted(path: Path, what: str, own_uid: int | None = None) -> str | None:
    """One line naming ``path`` (a ``what``: see CONSEQUENCES), what is
    wrong and the command that fixes it; None when only root and the
    bridge's user (``own_uid``, default ours) can change it, or when it is
    not there (whoever reads it says so)."""
    own_uid = os.geteuid() if own_uid is None else own_uid
    trusted = {0, own_uid}
    why = CONSEQUENCES.get(what, "the bridge trusts it")
    try:
        info = path.stat()
    except OSError:
        return None
    if info.st_uid not in trusted:
        return (f"{what} {path} is owned by {_owner(info.st_uid)}, not root or the bridge's "
                f"user, and {why}: chown root {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = "others" if mode & 0o002 else "its group"
        return (f"{what} {path} is writable by {who} (mode {mode:04o}), and {why}: "
                f"chmod go-w {path}")
    for directory in _directories(path):
        try:
            held = directory.stat()
        except OSError:
            continue
        if held.st_uid not in trusted:
            return (f"{what} {path}: the directory {directory} above it is owned by "
                    f"{_owner(held.st_uid)}, who can replace it, and {why}: move it, or "
                    f"chown root {directory}")
        dir_mode = stat.S_IMODE(held.st_mode)
        if dir_mode & 0o002 and not dir_mode & stat.S_ISVTX:
            return (f"{what} {path}: the directory {directory} above it is writable by "
                    f"others without the sticky bit (mode {dir_mode:04o}), so anyone can "
                    f"replace it, and {why}: chmod o-w {directory}")
        if dir_mode & 0o020 and not dir_mode & stat.S_ISVTX \
                and _group_name(held.st_gid) not in ROOTS_GROUPS:
            return (f"{what} {path}: the directory {directory} above it is writable by its "
                    f"group {_group_name(held.st_gid)} (mode {dir_mode:04o}), whose members "
                    f"can replace it, and {why}: chmod g-w {directory}")
    return None


#: Groups whose members may write where root's programs live: root's own,
#: and Debian's ``staff`` (older installs make /usr/local root:staff 2775;
#: Debian documents staff as able to become root through it).
ROOTS_GROUPS = {"root", "staff"}


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"
