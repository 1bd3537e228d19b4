"""The command line itself: help for every option, the paper-key prompt, what the offline
heal commands print, and their exit codes."""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import subprocess
import sys

from conftest import LNMIRROR, MOUNT, REPO, force_unmount, is_mounted, lnmirror
from lnmirrorfs import codec
from lnmirrorfs.cli import lnmirror_parser, mount_parser


def all_parsers() -> list[argparse.ArgumentParser]:
    parsers = [lnmirror_parser(), mount_parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


def test_every_option_and_argument_has_help():
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in all_parsers() for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert missing == []
    for p in all_parsers():
        assert "exit codes: 0" in p.format_help(), p.prog


def run_on_terminal(argv: list[str], typed: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as its controlling terminal, stdin, stdout and stderr;
    type `typed` once it prompts; return its exit code and everything the terminal showed."""
    pid, fd = os.forkpty()
    if pid == 0:
        os.chdir(REPO)
        os.execv(argv[0], argv)
    shown = b""
    typed_yet = False
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no output for {timeout}s; so far: {shown!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
        if not typed_yet and b"paper key" in shown:
            os.write(fd, typed.encode() + b"\n")
            typed_yet = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_paper_key_prompt_does_not_echo_the_key(volume):
    key = volume.key.read_text().strip()
    code, shown = run_on_terminal([sys.executable, "-m", "lnmirrorfs", "key", "--check",
                                   "--replica", str(volume.replicas[0])], key)
    assert code == 0 and "key OK" in shown, shown
    assert key not in shown and key.replace("-", "")[:8] not in shown.replace("-", ""), shown


def test_paper_key_length_is_counted_without_dashes(volume):
    key = volume.key.read_text().strip()
    for typed, count in ((key[:-1], 55), (key + "-AAAA", 60), (key.replace("-", " "), None)):
        proc = lnmirror("key", "--check", "--replica", str(volume.replicas[0]), input=typed + "\n",
                        check=False)
        if count is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode == 1
            assert proc.stderr == (f"lnmirror: key must have 56 characters not counting dashes and "
                                   f"spaces, got {count}\n")


TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.M)


def test_offline_replace_exits_0_and_prints_only_its_report(volume, tmp_path):
    data = os.urandom(100_000)
    m = volume.mount()
    (m.path / "channels").write_bytes(data)
    assert m.unmount() == 0
    dead, new = volume.replicas[1], tmp_path / "new"
    shutil.rmtree(dead)
    new.mkdir()
    proc = lnmirror("replace", "--replica", str(volume.replicas[0]), "--key-file", str(volume.key),
                    str(dead), str(new), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert not TIMESTAMPED.search(proc.stdout) and f"healed replica {new}" in proc.stdout
    # the new replica alone holds everything
    out = tmp_path / "out"
    lnmirror("restore", "--replica", str(new), "--key-file", str(volume.key), str(out))
    assert (out / "channels").read_bytes() == data
    # scrub: clean now, exit 0, no log lines either; -v shows progress with timestamps
    both = ["--replica", str(volume.replicas[0]), "--replica", str(new), "--key-file", str(volume.key)]
    proc = lnmirror("scrub", *both, check=False)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("scrub clean")
    shutil.rmtree(new)
    newer = tmp_path / "newer"
    newer.mkdir()
    proc = lnmirror("replace", "-v", "--replica", str(volume.replicas[0]), "--key-file",
                    str(volume.key), str(new), str(newer), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert TIMESTAMPED.search(proc.stderr) and "INFO" in proc.stderr


def test_daemonized_mount_refusal_exits_like_foreground(volume, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_text(codec.encode_paper_key(os.urandom(32)) + "\n")
    wrong.chmod(0o400)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    codes = []
    for foreground in ([], ["-f"]):
        proc = subprocess.run(MOUNT + [str(mnt), *foreground, *volume.replica_args()[:-2],
                                       "--key-file", str(wrong)],
                              capture_output=True, text=True, timeout=60)
        if is_mounted(mnt):
            force_unmount(mnt)
        assert len(proc.stderr.splitlines()) == 1 and "wrong key" in proc.stderr, proc.stderr
        codes.append(proc.returncode)
    assert codes == [2, 2]


def test_a_reader_that_leaves_early_gets_no_traceback(make_vol):
    """`lnmirror status | head -1`: the reader closes the pipe before the output comes."""
    v = make_vol()
    proc = subprocess.Popen([*LNMIRROR, "status", *v.replica_args()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # before the command has started up and printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err
