"""The cache folder: its entries, the size limit that removes the least recently used features, and
`transferctl cache` to list and clear it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import Notices, head_only, heavy_imports
from transferctl.runs import cache_folder as cf
from transferctl.cli import app
from transferctl.config import config_from_dict
from transferctl.errors import ConfigError
from transferctl.training.train import train

runner = CliRunner()
MB = 2**20


def features(folder: Path, name: str, megabytes: float, used: float, about: dict | None = None) -> Path:
    """A features file the cache wrote, of the given size, last used `used` seconds ago, with its description when given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"features-{name}.npy"
    path.write_bytes(b"\0" * int(megabytes * MB))
    cf.record(path)
    if about is not None:
        cf.describe(path, about)
    stamp = time.time() - used
    os.utime(path, (stamp, stamp))
    return path


def unfinished(folder: Path, pid: int, age: float) -> Path:
    path = folder / f"features-{'abc0' * 8}.npy.tmp-{pid}"  # the key's 32 hex digits: the name a run writes
    path.write_bytes(b"\0" * 100)
    os.utime(path, (time.time() - age,) * 2)
    return path


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_entries_are_what_transferctl_wrote_least_recently_used_first(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    old = features(folder, "old", 0.5, used=300, about={"backbone": "resnet18", "images": 10})
    new = features(folder, "new", 0.25, used=10)
    cf.save_json(folder / "backbones.json", {"key": "torchvision", "facts": {}})
    (folder / "notes.txt").write_text("someone else's")
    listed = cf.entries()
    assert [entry.path.name for entry in listed] == ["features-old.npy", "features-new.npy", "backbones.json"]
    assert listed[0].kind == "features" and listed[0].about == {"backbone": "resnet18", "images": 10}
    assert listed[0].size == old.stat().st_size + cf.about_path(old).stat().st_size and listed[1].size == new.stat().st_size
    assert listed[2].kind == "backbone facts"
    assert cf.entries(folder / "missing") == []


def test_the_limit_removes_the_least_recently_used_features_first(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    oldest = features(folder, "a", 1, used=300, about={"backbone": "resnet18"})
    middle = features(folder, "b", 1, used=200)
    newest = features(folder, "c", 1, used=100)
    (folder / "notes.txt").write_bytes(b"\0" * 3 * MB)  # not ours: neither counted nor removed
    removed = cf.keep_under_limit(int(2.5 * MB), keep={newest})
    assert [entry.path for entry in removed] == [oldest]
    assert not oldest.exists() and not cf.about_path(oldest).exists()
    assert middle.exists() and newest.exists() and (folder / "notes.txt").exists()


def test_the_features_a_run_uses_stay_even_over_the_limit(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    older = features(folder, "a", 1, used=300)
    kept = features(folder, "b", 2, used=600)
    removed = cf.keep_under_limit(1 * MB, keep={kept})
    assert [entry.path for entry in removed] == [older] and kept.exists()
    assert cf.keep_under_limit(None, keep=set()) == [] and kept.exists()  # no limit


def test_a_reuse_makes_an_entry_the_most_recent(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    reused = features(folder, "a", 1, used=300)
    other = features(folder, "b", 1, used=100)
    cf.mark_used(reused)
    cf.keep_under_limit(1 * MB, keep=set())
    assert reused.exists() and not other.exists()


def test_unfinished_files_go_only_when_their_run_is_gone(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    folder.mkdir()
    gone = unfinished(folder, dead_pid(), age=3600)
    entry = next(e for e in cf.entries() if e.path == gone)
    assert entry.kind == "unfinished" and cf.is_abandoned(entry)
    assert not cf.is_abandoned(entry, now=entry.last_used + 60)  # lately written: maybe another machine's run
    writing = unfinished(folder, os.getpid(), age=3600)
    alive = next(e for e in cf.entries() if e.path == writing)
    assert not cf.is_abandoned(alive)
    removed = cf.keep_under_limit(None, keep=set())
    assert [e.path for e in removed] == [gone] and alive.path.exists()


def test_a_description_whose_features_were_deleted_by_hand_goes(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    deleted = features(folder, "a", 0.1, used=60, about={"backbone": "resnet18"})
    kept = features(folder, "b", 0.1, used=60, about={"backbone": "resnet50"})
    deleted.unlink()
    stray = [entry for entry in cf.entries() if entry.kind == "stray description"]
    assert [entry.path for entry in stray] == [cf.about_path(deleted)]
    assert [entry.path for entry in cf.keep_under_limit(None, keep=set())] == [cf.about_path(deleted)]
    assert cf.about_path(kept).exists() and not cf.about_path(deleted).exists()


def test_the_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cf.limit_bytes() == cf.DEFAULT_LIMIT_MB * MB
    monkeypatch.setenv(cf.LIMIT_ENV, "500")
    assert cf.limit_bytes() == 500 * MB
    monkeypatch.setenv(cf.LIMIT_ENV, "None")
    assert cf.limit_bytes() is None
    monkeypatch.setenv(cf.LIMIT_ENV, "5GB")
    with pytest.raises(ConfigError, match=r"TRANSFERCTL_CACHE_MAX_MB: '5GB' is not a size in megabytes"):
        cf.limit_bytes()


def test_clear_removes_everything_or_what_was_not_used_lately(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    stale = features(folder, "a", 0.1, used=3 * 86400)
    recent = features(folder, "b", 0.1, used=60)
    live = unfinished(folder, os.getpid(), age=5 * 86400)
    assert [e.path for e in cf.clear(older_than_days=2)] == [stale]
    assert [e.path for e in cf.clear()] == [recent]
    assert live.exists()  # its run is still writing it


def test_clear_removes_only_what_the_cache_wrote(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    ours = features(folder, "a", 0.1, used=60, about={"backbone": "resnet18"})
    mine = {"backbones.json": '{"my": "backbones"}', "features-train.npy": "my features", "features-train.json": "{}", "notes.txt": "notes"}
    for name, text in mine.items():
        (folder / name).write_text(text)
    cf.save_json(folder / "backbones.json", {"key": "torchvision", "facts": {}})  # a cache write: the user's file stays as it was
    result = runner.invoke(app, ["cache", "--clear"])
    assert result.exit_code == 0, result.output
    assert "removed 1 entry" in result.stderr
    assert "left alone: backbones.json, features-train.json, features-train.npy, notes.txt (not written by transferctl's cache)" in result.stderr
    assert {name: (folder / name).read_text() for name in mine} == mine
    assert not ours.exists() and not cf.about_path(ours).exists() and not (folder / cf.MANIFEST).exists()  # nothing of ours is left


def test_a_cache_from_before_the_manifest_is_known_by_its_files_exact_shape(isolated_feature_cache: Path) -> None:
    import numpy as np

    folder = isolated_feature_cache
    folder.mkdir()
    key = "0123456789abcdef" * 2
    np.save(folder / f"features-{key}.npy", np.zeros((2, 1, 3), dtype=np.float32))
    (folder / f"features-{key}.json").write_text('{"backbone": "resnet18"}')
    (folder / "backbones.json").write_text('{"key": "torchvision 0.20; 12ab", "facts": {}}')
    lookalikes = {f"features-{'f' * 32}.npy": "not an array", "features-mine.npy": "", "backbones.json.bak": "{}"}
    for name, text in lookalikes.items():
        (folder / name).write_text(text)
    assert sorted(entry.path.name for entry in cf.entries()) == ["backbones.json", f"features-{key}.npy"]
    assert [path.name for path in cf.others()] == sorted(lookalikes)
    assert len(cf.clear()) == 2 and sorted(path.name for path in folder.iterdir()) == sorted(lookalikes)


def test_the_limit_never_counts_or_removes_what_the_cache_did_not_write(isolated_feature_cache: Path) -> None:
    folder = isolated_feature_cache
    ours = features(folder, "a", 1, used=60)
    mine = folder / "features-mine.npy"
    mine.write_bytes(b"\x93NUMPY" + b"\0" * 2 * MB)
    assert cf.keep_under_limit(int(1.5 * MB), keep=set()) == [] and mine.exists()
    assert [entry.path for entry in cf.keep_under_limit(MB // 2, keep=set())] == [ours] and mine.exists()


# --------------------------------------------------------------------------- training


def test_a_new_features_file_is_described_and_pushes_out_the_oldest(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip

    stranger = features(isolated_feature_cache, "stranger", 1, used=86400)
    monkeypatch.setenv(cf.LIMIT_ENV, "1")
    notices = Notices()
    train(config_from_dict(head_only(tiny_split_data, tmp_path / "a", cache="disk", epochs=1)), observer=notices)
    assert not stranger.exists()
    written = {entry.about["split"]: entry for entry in cf.entries() if entry.kind == "features"}
    assert set(written) == {"train", "val"}
    about = written["train"].about
    assert about["backbone"] == "resnet18" and about["images"] == len(list((tiny_split_data / "train").rglob("*.png")))
    assert about["views"] == 1 and about["width"] == 512 and about["data"] == str(tiny_split_data / "train")
    assert any("removed 1 least recently used file(s), 1 MB" in line for line in notices.lines), notices.lines


def test_a_reused_entry_without_a_description_gets_one(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:

    raw = head_only(tiny_split_data, tmp_path / "a", cache="disk", epochs=1)
    train(config_from_dict(raw))
    for about in isolated_feature_cache.glob("features-*.json"):
        about.unlink()  # as an entry from before descriptions were written
    summary = train(config_from_dict(raw))
    assert all(record["reused"] for record in summary["feature_cache"])
    assert sorted(entry.about["split"] for entry in cf.entries() if entry.kind == "features") == ["train", "val"]


def test_a_mistyped_limit_stops_training_before_any_work(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv(cf.LIMIT_ENV, "lots")
    with pytest.raises(ConfigError, match="TRANSFERCTL_CACHE_MAX_MB"):
        train(config_from_dict(head_only(tiny_split_data, tmp_path / "a", epochs=1)))


# --------------------------------------------------------------------------- the command


def test_cache_lists_entries_with_what_they_are_of(isolated_feature_cache: Path) -> None:
    features(isolated_feature_cache, "a", 0.5, used=60, about={"backbone": "resnet50", "split": "train", "data": "/data/pets/train", "images": 120, "views": 3})
    result = runner.invoke(app, ["cache"])
    assert result.exit_code == 0, result.output
    assert "transferctl-cache: 1 entry, 0.5 MB (limit 10240 MB)" in result.stderr
    assert "resnet50: train of /data/pets/train, 120 images x 3 views" in result.stderr
    document = json.loads(runner.invoke(app, ["cache", "--json"]).stdout)
    assert document["folder"] == str(isolated_feature_cache) and document["limit_mb"] == cf.DEFAULT_LIMIT_MB
    assert document["entries"][0]["backbone"] == "resnet50" and document["entries"][0]["megabytes"] == pytest.approx(0.5, abs=0.01)


def test_cache_clear_says_what_it_removed(isolated_feature_cache: Path) -> None:
    features(isolated_feature_cache, "old", 1, used=10 * 86400)
    kept = features(isolated_feature_cache, "new", 1, used=60)
    result = runner.invoke(app, ["cache", "--clear", "--older-than", "7", "--json"])
    assert result.exit_code == 0 and [e["path"] for e in json.loads(result.stdout)["removed"]] == [str(isolated_feature_cache / "features-old.npy")]
    result = runner.invoke(app, ["cache", "--clear"])
    assert "removed 1 entry (1.0 MB)" in result.stderr and not kept.exists()
    assert "holds nothing of transferctl's" in runner.invoke(app, ["cache"]).stderr


def test_cache_refuses_bad_input_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["cache", "--older-than", "3"])
    assert result.exit_code == 2 and "only applies with --clear" in result.output
    monkeypatch.setenv(cf.LIMIT_ENV, "-5")
    result = runner.invoke(app, ["cache"])
    assert result.exit_code == 1 and result.stderr.strip() == (
        "error: TRANSFERCTL_CACHE_MAX_MB: '-5' is not a size in megabytes (set a whole number such as 10240, or none for no limit)"
    )


def test_cache_does_not_import_torch(isolated_feature_cache: Path) -> None:

    features(isolated_feature_cache, "a", 0.1, used=60)
    assert heavy_imports("cache") == "HEAVY="
    assert heavy_imports("cache", "--json") == "HEAVY="
