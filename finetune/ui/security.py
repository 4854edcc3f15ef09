"""What the web UI refuses, in one place: files outside the output root, file types other than pictures, JSON and
text, Host headers that are not this machine's (DNS rebinding), and state-changing requests without the token.

A requested path is resolved first (symlinks followed, `..` collapsed) and only then compared with the resolved
root, so `../x`, `%2e%2e/x` (the server sees it decoded), `/etc/passwd` (which `root / "/etc/passwd"` turns into
itself) and a symlink that leads out all end outside the root and are refused.
"""

import secrets
from pathlib import Path

# The only files served, by suffix: what the pages show (grids, process strips, evaluation, logs).
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".json": "application/json",
    ".jsonl": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
TOKEN_HEADER = "X-Finetune-Token"


def inside(root: Path, relative: str) -> Path | None:
    """`root / relative` resolved, or None when that lies outside the resolved `root` (absolute paths, `..`,
    symlinks leading out) or `relative` is empty or holds a NUL."""
    if not relative or "\0" in relative:
        return None
    root = root.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if path == root or path.is_relative_to(root) else None


def servable(root: Path, relative: str) -> tuple[Path, str] | None:
    """The file to send for `relative` and its media type, or None: outside the root, not a regular file, or not a
    type in MEDIA_TYPES (hidden files and folders, such as the run lock, are never sent)."""
    path = inside(root, relative)
    if path is None or path == root.resolve() or not path.is_file():
        return None
    if any(part.startswith(".") for part in path.relative_to(root.resolve()).parts):
        return None
    media_type = MEDIA_TYPES.get(path.suffix.lower())
    return (path, media_type) if media_type else None


def host_allowed(host: str | None, allowed: set[str], port: int) -> bool:
    """Whether a request's Host header names this server: one of `allowed` (host names, lower case), with no port
    or with `port`. A page served from another name that resolves here (DNS rebinding) is refused."""
    if not host:
        return False
    host = host.strip().lower()
    name, _, given = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name:  # no port given
        name, given = host, ""
    return name in allowed and given in ("", str(port))


def new_token() -> str:
    """A random token for this launch of the server (32 bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a request's token with the server's."""
    return bool(given) and secrets.compare_digest(given.encode(), token.encode())
