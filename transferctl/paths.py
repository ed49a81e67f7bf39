"""Paths the user gives, as the operating system sees them.

A name over 255 bytes (ENAMETOOLONG) or a symlink loop (ELOOP; pathlib's resolve raises RuntimeError for
it before Python 3.13) is the user's to fix, not a bug: `checked` and `resolved` turn them into one line
naming the field or path. `open_regular` reads only regular files, since a FIFO blocks open() forever.
`shown` keeps such paths one short line in messages.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from transferctl.errors import Problem, TransferctlError, one_line

NAME_MAX = 255  # bytes in one name on the file systems of Linux, macOS and Windows
SHOWN_NAME = 48  # characters of one name a message shows: a longer one keeps its two ends


def shown(path: str | os.PathLike[str]) -> str:
    """The path for a one-line message: control characters and bytes that are not UTF-8 escaped (a newline
    in a name would split the line), each long name cut in the middle."""
    return os.sep.join(_shown_name(name) for name in os.fspath(path).split(os.sep))


def _shown_name(name: str) -> str:
    # Python holds a name's bytes that are not UTF-8 as lone surrogates, which no terminal can print: \xff.
    text = one_line(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if len(text) <= SHOWN_NAME:
        return text
    keep = (SHOWN_NAME - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"


def path_trouble(exc: BaseException, path: str | os.PathLike[str]) -> str | None:
    """What a failed lookup says about the path itself (a name too long, a symlink loop); None otherwise."""
    code = getattr(exc, "errno", None)
    if code == errno.ENAMETOOLONG:
        longest = max((len(os.fsencode(name)) for name in Path(path).parts), default=0)
        if longest > NAME_MAX:
            return f"has a name of {longest} bytes, where file systems allow {NAME_MAX}"
        return "is longer than the operating system allows"
    if code == errno.ELOOP or (isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop")):
        return "runs into a symlink loop: links that lead back to each other"
    return None


def path_problem(path: str | os.PathLike[str], reason: str, where: str = "") -> Problem:
    """`where: <path> <reason>`, or `<path>: <reason>` without a field to name."""
    hint = "fix or remove the link" if "symlink" in reason else "shorten that name"
    return Problem(where, f"{shown(path)} {reason}", hint) if where else Problem(shown(path), reason, hint)


def checked(path: Path, error: type[TransferctlError], where: str = "") -> Path:
    """path, once the system can look it up: a name too long or a symlink loop raises `error` naming `where`
    (or the path). Whether the path exists, and as what, is left to the caller, with its own message."""
    try:
        os.stat(path)
    except OSError as exc:
        _refuse_trouble(exc, path, error, where)
    return path


def resolved(path: Path, error: type[TransferctlError], where: str = "") -> Path:
    """Path.resolve, with a symlink loop or a name too long as `error` naming `where`."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        _refuse_trouble(exc, path, error, where)
        raise


def _refuse_trouble(exc: BaseException, path: Path, error: type[TransferctlError], where: str) -> None:
    reason = path_trouble(exc, path)
    if reason is not None:
        raise error(path_problem(path, reason, where)) from None


class NotRegularFile(OSError):
    """A FIFO, socket or device where a file's bytes were wanted."""

    def __str__(self) -> str:
        return self.strerror or "not a regular file"


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: Path) -> BinaryIO:
    """The file opened for reading, when it is a regular file (or a link to one); NotRegularFile otherwise.

    Opened without blocking, then checked: open() on a FIFO waits for a writer that may never come, and a
    device may never end. Checking the opened file, not the name, leaves no moment to swap the file in between.
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "a special file")
            raise NotRegularFile(None, f"{kind}, not a regular file", str(path))
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
