"""Whether a system account may log on, as PAM's account stage (pam_unix's
``pam_acct_mgmt``) would say, for users whose password is in the users
file: their system account is what their desktop runs as.

Read from ``/etc/shadow`` (root only) by hand: Python's ``spwd`` module is
gone in 3.13. The fields (shadow(5)): name, password, last change, min,
max, warn, inactive, expire, all in days since 1970-01-01; empty is unset.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

SHADOW = Path("/etc/shadow")


def _days(field: str) -> int | None:
    try:
        return int(field) if field else None
    except ValueError:
        return None


def _locked(password: str) -> bool:
    """``usermod -L`` / ``passwd -l`` put a ``!`` before the password hash.
    A field with no hash behind the ``!`` (``!``, ``!!``, ``!*``, ``*``) is
    an account that never had a password, as ``useradd`` leaves it: the
    users file is its password, so it is not locked for us."""
    if password.startswith("*LK*"):
        return True
    return password.startswith("!") and password.lstrip("!") not in ("", "*")


def _date(days: int) -> str:
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=days)).isoformat()


def account_problem(name: str, shadow: Path = SHADOW, today: int | None = None
                    ) -> str | None:
    """Why the system account ``name`` may not log on (locked, expired,
    password expired past its inactive period), or None: it may, or it has
    no shadow entry. Raises OSError when ``shadow`` cannot be read (not
    root); a missing file is no entry."""
    try:
        text = shadow.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    if today is None:
        today = int(time.time() // 86400)
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] != name or len(fields) < 8:
            continue
        password = fields[1]
        last_change, maximum, inactive, expire = (_days(fields[i]) for i in (2, 4, 6, 7))
        if _locked(password):
            return "its system account is locked"
        # pam_unix's check_shadow_expiry: expired on the day itself.
        if expire is not None and expire >= 0 and today >= expire:
            return f"its system account expired on {_date(expire)}"
        # A password past its maximum age and then its inactive period
        # (pam_unix: PAM_AUTHTOK_EXPIRED). An empty last change turns aging off.
        if last_change and maximum is not None and inactive is not None \
                and maximum >= 0 and inactive >= 0 \
                and today - last_change > maximum + inactive:
            return (f"its system account is inactive (password older than {maximum} days, "
                    f"then {inactive} days of grace)")
        return None
    return None
