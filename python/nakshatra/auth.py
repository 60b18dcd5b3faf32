"""Cluster keys (see docs/security.md and cpp/protocol/auth.h).

A key is 32 random bytes, kept as 64 hex digits in a file of mode 0600 (``nak keygen``). Stages
and clients read it from ``--key-file FILE`` or the environment variable ``NAK_KEY`` (hex). With
a key, both ends of every connection prove they hold it (HMAC-SHA256 over fresh nonces) and every
frame carries a MAC; nothing is encrypted.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import NakError

KEY_SIZE = 32
ENV_VAR = "NAK_KEY"


def parse_key(text: str, where: str) -> bytes:
    """32 bytes from 64 hex digits (surrounding whitespace allowed); NakError naming ``where``."""
    s = "".join(text.split())
    try:
        key = bytes.fromhex(s)
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise NakError(f"{where}: a cluster key is {2 * KEY_SIZE} hex digits; make one with `nak keygen`")
    return key


def generate_key_file(path: Path, overwrite: bool = False) -> bytes:
    """Write a fresh key to ``path`` (mode 0600, created so; never world-readable even briefly)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise NakError(f"{path} exists; remove it first or pass --force (the stages holding the old key "
                       "would refuse clients with the new one)")
    key = secrets.token_bytes(KEY_SIZE)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key.hex() + "\n").encode())
    finally:
        os.close(fd)
    return key


def load_key(key_file: str | Path | None = None, env: bool = True) -> bytes | None:
    """The cluster key from ``key_file``, else from ``$NAK_KEY`` (when ``env``), else None."""
    if key_file:
        p = Path(key_file)
        try:
            text = p.read_text()
        except OSError as e:
            raise NakError(f"--key-file {p}: {e.strerror or e}; make one with `nak keygen -o {p}`") from None
        if p.stat().st_mode & 0o077:
            import sys
            print(f"nak: warning: {p} is readable by other users; chmod 600 it", file=sys.stderr)
        return parse_key(text, str(p))
    if env and os.environ.get(ENV_VAR):
        return parse_key(os.environ[ENV_VAR], f"${ENV_VAR}")
    return None
