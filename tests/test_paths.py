"""paths.py: names too long and symlink loops as one-line errors, only regular files opened, paths shown short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from transferctl.errors import ConfigError, DataError
from transferctl.paths import NotRegularFile, checked, open_regular, resolved, shown

LONG = "n" * 300  # one name over the 255 bytes file systems allow


def test_shown_cuts_long_names_and_escapes_what_would_break_the_line() -> None:
    assert shown("/data/cat/01.png") == "/data/cat/01.png"
    assert shown(f"/data/{LONG}/x.png") == f"/data/{'n' * 22}...{'n' * 22}/x.png"
    assert shown("/data/bad\nname.png") == "/data/bad\\nname.png"
    assert shown(os.fsdecode(b"/data/caf\xe9.png")) == "/data/caf\\xe9.png"  # Latin-1 bytes, not UTF-8


def test_checked_refuses_a_name_too_long_and_a_loop_and_leaves_the_rest_to_the_caller(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)

    with pytest.raises(DataError, match=r"^data.root: .*n\.\.\.n.* has a name of 300 bytes, where file systems allow 255 \(shorten that name\)$"):
        checked(tmp_path / LONG, DataError, "data.root")
    with pytest.raises(DataError, match=r"/loop/x: runs into a symlink loop"):
        checked(loop / "x", DataError)
    assert checked(tmp_path / "missing", DataError) == tmp_path / "missing"


def test_resolved_turns_pathlibs_symlink_loop_into_the_fields_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)

    with pytest.raises(ConfigError, match="^output.dir: .*/loop runs into a symlink loop"):
        resolved(loop, ConfigError, "output.dir")
    assert resolved(tmp_path / "a" / ".." / "b", ConfigError) == tmp_path.resolve() / "b"


def test_open_regular_reads_files_and_refuses_folders_and_devices(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"bytes")
    with open_regular(tmp_path / "a.png") as handle:
        assert handle.read() == b"bytes"
    with pytest.raises(IsADirectoryError):
        open_regular(tmp_path)
    with pytest.raises(NotRegularFile, match="^a character device, not a regular file$"):
        open_regular(Path(os.devnull))


def test_open_regular_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """A child process, so that a regression fails on its timeout instead of hanging the tests."""
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    script = "import sys; from pathlib import Path; from transferctl.paths import open_regular\ntry:\n    open_regular(Path(sys.argv[1]))\nexcept OSError as exc:\n    print(exc)"

    done = subprocess.run([sys.executable, "-c", script, str(fifo)], capture_output=True, text=True, timeout=60)

    assert done.stdout.strip() == "a FIFO (named pipe), not a regular file", done.stderr
