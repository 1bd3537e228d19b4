"""A progress line (bytes, rate, ETA) on a terminal for restore, scrub (offline and live),
replace and init --from; nothing of it when the output is not a terminal."""

from __future__ import annotations

import os
import sys

from test_cli import run_on_terminal

from conftest import lnmirror

LNMIRROR = [sys.executable, "-m", "lnmirrorfs"]
SIZE = 24 << 20


def progress_shown(shown: str, label: str) -> bool:
    return f"{label}: " in shown and " of " in shown and "/s, ETA" in shown


def test_restore_and_scrub_show_progress_on_a_terminal_only(volume, tmp_path):
    m = volume.mount()
    (m.path / "big").write_bytes(os.urandom(SIZE))
    live = run_on_terminal(LNMIRROR + ["scrub", str(m.path), "--rate", "30"], "")
    assert live[0] == 0 and progress_shown(live[1], "scrub"), live[1]
    assert m.unmount() == 0
    code, shown = run_on_terminal(LNMIRROR + ["restore", *volume.replica_args(),
                                              str(tmp_path / "out")], "")
    assert code == 0 and progress_shown(shown, "restore") and "24.0 MiB of 24.0 MiB" in shown, shown
    code, shown = run_on_terminal(LNMIRROR + ["scrub", *volume.replica_args()], "")
    assert code == 0 and progress_shown(shown, "scrub"), shown
    piped = lnmirror("restore", *volume.replica_args(), str(tmp_path / "out2"))
    assert "restore: " not in piped.stderr and "ETA" not in piped.stdout + piped.stderr


def test_import_shows_progress(tmp_path):
    source = tmp_path / "node"
    source.mkdir()
    (source / "lightningd.sqlite3").write_bytes(os.urandom(SIZE))
    replicas = [tmp_path / "a", tmp_path / "b"]
    for r in replicas:
        r.mkdir()
    code, shown = run_on_terminal(LNMIRROR + ["init", "--replica", str(replicas[0]), "--replica",
                                              str(replicas[1]), "--key-file", str(tmp_path / "key"),
                                              "--from", str(source)], "")
    assert code == 0 and progress_shown(shown, "import"), shown
