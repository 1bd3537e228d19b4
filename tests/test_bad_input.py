"""Bad input matrix: every command, every kind of wrong input.  Each gets one clear line on
stderr (no traceback), a non-zero exit, and leaves every replica byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import MOUNT, REPO, force_unmount, lnmirror, make_volume
from lnmirrorfs import codec, format


def replica_bytes(dirs) -> dict:
    out = {}
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            for name in files:
                path = os.path.join(dirpath, name)
                out[path] = (open(path, "rb").read(), os.stat(path).st_mode)
    return out


@pytest.fixture
def world(tmp_path):
    """A volume with data, another (foreign) volume, and spare keys of every bad kind."""
    v = make_volume(tmp_path / "vol", n=2, k=1)
    m = v.mount()
    (m.path / "hsm_secret").write_bytes(os.urandom(32))
    assert m.unmount() == 0
    other = make_volume(tmp_path / "other", n=2, k=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    wrong_key = bad / "wrong.key"
    wrong_key.write_text(codec.encode_paper_key(os.urandom(32)) + "\n")
    wrong_key.chmod(0o400)
    typo = bad / "typo.key"
    text = v.key.read_text()
    typo.write_text(("B" if text[0] != "B" else "C") + text[1:])
    typo.chmod(0o400)
    loose = bad / "loose.key"
    loose.write_text(text)
    loose.chmod(0o644)
    unreadable = bad / "unreadable.key"  # a directory: unreadable even for root
    unreadable.mkdir(mode=0o700)
    newer = bad / "newer"
    shutil.copytree(v.replicas[1], newer)
    header = bytearray((newer / format.HEADER_NAME).read_bytes())
    struct.pack_into("<H", header, 8, format.FORMAT_VERSION + 1)  # as a newer release writes it
    body_end = format.HEADER_SIZE - 2 * codec.CHECKSUM_BYTES
    header[body_end:body_end + codec.CHECKSUM_BYTES] = hashlib.blake2b(
        bytes(header[:body_end]), digest_size=codec.CHECKSUM_BYTES).digest()
    (newer / format.HEADER_NAME).chmod(0o600)
    (newer / format.HEADER_NAME).write_bytes(bytes(header))
    for empty in ("e1", "e2"):
        (tmp_path / empty).mkdir()
    notreplica = bad / "plain"
    notreplica.mkdir()
    (notreplica / "file").write_text("x")
    return {"v": v, "other": other, "wrong_key": wrong_key, "typo": typo, "loose": loose,
            "unreadable": unreadable, "newer": newer, "plain": notreplica,
            "missing": bad / "missing", "mnt": tmp_path / "mnt", "tmp": tmp_path}


def cases(w) -> list[tuple[str, list[str], str]]:
    v = w["v"]
    a, b = (str(r) for r in v.replicas)
    key = str(v.key)
    good = ["--replica", a, "--replica", b]
    out = str(w["tmp"] / "restore-target")
    commands = {  # how each command takes replicas + key
        "status": lambda reps, k: ["status", *reps, "--key-file", k],
        "scrub": lambda reps, k: ["scrub", *reps, "--key-file", k],
        "restore": lambda reps, k: ["restore", *reps, "--key-file", k, out],
        "mount": lambda reps, k: ["MOUNT", str(w["mnt"]), "-f", *reps, "--key-file", k],
    }
    # (A damaged header is not bad input but a fault: that replica is FAULTED and the
    # others serve; see tests/test_state_choice.py.)
    inputs = [
        ("wrong key", good, str(w["wrong_key"]), "wrong key"),
        ("mistyped key", good, str(w["typo"]), "mistyped"),
        ("loose key file", good, str(w["loose"]), "chmod 400"),
        ("unreadable key file", good, str(w["unreadable"]), "key file"),
        ("missing key file", good, str(w["tmp"] / "nokey"), "does not exist"),
        ("foreign replica", ["--replica", a, "--replica", str(w["other"].replicas[1])], key,
         "belongs to volume"),
        ("newer format", ["--replica", a, "--replica", str(w["newer"])], key, "upgrade"),
        ("not a replica", ["--replica", a, "--replica", str(w["plain"])], key,
         "not an lnmirrorfs replica"),
        ("same replica twice", ["--replica", a, "--replica", a], key, "twice"),
        ("copied replica", ["--replica", a, "--replica", str(w["newer"]).replace("newer", "")
                            + "../vol/replica0"], key, "twice"),
    ]
    out_cases = []
    for command, build in commands.items():
        for label, reps, k, expect in inputs:
            out_cases.append((f"{command}: {label}", build(reps, k), expect))
    out_cases += [
        ("init: missing dir", ["init", "--replica", str(w["missing"]), "--replica", b], "does not exist"),
        ("init: existing volume", ["init", "--replica", a, "--replica", b, "--key-file",
                                   str(w["tmp"] / "k2")], "already belongs"),
        ("init: non-empty dir", ["init", "--replica", str(w["plain"]), "--replica",
                                 str(w["tmp"] / "bad")], "not empty"),
        ("init: k > n", ["init", "--replica", str(w["missing"]), "--replica", b, "-k", "3"],
         "between"),
        ("init: one replica", ["init", "--replica", str(w["missing"])], "at least two"),
        ("init: existing key file", ["init", "--replica", str(w["tmp"] / "e1"), "--replica",
                                     str(w["tmp"] / "e2"), "--key-file", key], "already exists"),
        ("status: nothing given", ["status"], "give a MOUNTPOINT"),
        ("status: not mounted", ["status", str(w["mnt"])], "no lnmirrorfs mount"),
        ("scrub: not mounted", ["scrub", str(w["mnt"])], "no lnmirrorfs mount"),
        ("status: --wait-unmounted without mountpoint", ["status", "--wait-unmounted", "1"],
         "needs the MOUNTPOINT"),
        ("status: --wait-unmounted with --json", ["status", str(w["mnt"]), "--wait-unmounted", "1",
                                                  "--json"], "prints no status"),
        ("status: --wait-unmounted not a number", ["status", str(w["mnt"]), "--wait-unmounted",
                                                   "soon"], "invalid float"),
        ("restore: into a non-empty dir", ["restore", *good, "--key-file", key, str(w["plain"])],
         "not an empty directory"),
        ("restore: no replicas", ["restore", str(w["tmp"] / "x")], "--replica"),
        ("key --check: wrong key", ["key", "--check", "--replica", a, "--key-file",
                                    str(w["wrong_key"])], "not the key"),
        ("mount: bad option value", ["MOUNT", str(w["mnt"]), "-f", *good, "--key-file", key,
                                     "-o", "quorum=many"], "not a number"),
        ("mount: quorum above n", ["MOUNT", str(w["mnt"]), "-f", *good, "--key-file", key,
                                   "--quorum", "3"], "between"),
        ("mount: missing mountpoint", ["MOUNT", str(w["tmp"] / "nomnt"), "-f", *good,
                                       "--key-file", key], "mountpoint"),
        ("mount: non-empty mountpoint", ["MOUNT", str(w["plain"]), "-f", *good, "--key-file", key],
         "not empty"),
        ("mount: read-only requested", ["MOUNT", str(w["mnt"]), "-f", *good, "--key-file", key,
                                        "-o", "ro"], "read-only"),
        ("mount: no replicas", ["MOUNT", str(w["mnt"]), "-f"], "no replicas"),
        ("mount: unknown option", ["MOUNT", str(w["mnt"]), "-f", *good, "--bogus"],
         "unrecognized arguments"),
        ("mount: every replica missing", ["MOUNT", str(w["mnt"]), "-f", "--replica",
                                          str(w["missing"]), "--key-file", key],
         "none of the replica directories exists"),
        ("config: missing file", ["status", "--config", str(w["tmp"] / "none.toml")],
         "cannot read config"),
    ]
    return out_cases


def run_case(argv: list[str]) -> subprocess.CompletedProcess:
    if argv[0] != "MOUNT":
        return lnmirror(*argv, check=False)
    try:
        return subprocess.run(MOUNT + argv[1:], capture_output=True, text=True, cwd=REPO, timeout=20)
    except subprocess.TimeoutExpired:  # it mounted although it should not have
        force_unmount(argv[1])
        return subprocess.CompletedProcess(argv, 0, "", "mounted and kept running")


def test_bad_inputs_fail_cleanly_and_change_nothing(world):
    w = world
    w["mnt"].mkdir()
    watched = [*w["v"].replicas, *w["other"].replicas, w["newer"]]
    before = replica_bytes(watched)
    failures = []
    for label, argv, expect in cases(w):
        proc = run_case(argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        problem = None
        if proc.returncode == 0:
            problem = "exit 0"
        elif "Traceback" in proc.stderr:
            problem = "traceback"
        elif len(lines) != 1:
            problem = f"{len(lines)} lines on stderr"
        elif expect.lower() not in lines[0].lower():
            problem = f"message lacks {expect!r}"
        if problem:
            failures.append(f"{label}: {problem}: {proc.stderr.strip()[:300]}")
    assert not failures, "\n".join(failures)
    assert replica_bytes(watched) == before
    assert os.listdir(w["mnt"]) == []


def test_paper_key_check_reads_stdin(world):
    v = world["v"]
    good = v.key.read_text()
    ok = lnmirror("key", "--check", "--replica", str(v.replicas[0]), input=good.lower())
    assert "key OK" in ok.stdout
    bad = lnmirror("key", "--check", "--replica", str(v.replicas[0]), input=good[:-5] + "\n",
                   check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_unknown_command_and_option(world):
    for argv in (["frobnicate"], ["status", "--bogus"]):
        proc = subprocess.run([sys.executable, "-m", "lnmirrorfs", *argv], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and "--help" in proc.stderr, proc.stderr
