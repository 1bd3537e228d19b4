"""Operator integration: fstab and mount(8), systemd units, config file, alert hook,
Prometheus output, status --wait, and import of an existing node directory."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MOUNT, REPO, Mount, force_unmount, is_mounted, lnmirror

VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def installed_commands():
    """mount.fuse3 and systemd look for the commands in the system PATH, where the README
    has the operator link them: link them there for the test if they are not, then unlink."""
    made = []
    for name in ("lnmirror", "mount_lnmirror"):
        link = Path("/usr/local/bin") / name
        if not link.exists():
            link.symlink_to(Path(VENV_BIN) / name)
            made.append(link)
    yield
    for link in made:
        link.unlink()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def wait_daemon_gone(mountpoint: Path) -> None:
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"mount_lnmirror.*{mountpoint}"],
                                    capture_output=True).returncode != 0)


def mount_options_of(path: Path) -> set[str]:
    with open("/proc/mounts") as f:
        return next(set(line.split()[3].split(",")) for line in f
                    if line.split()[1] == os.path.realpath(path))


@pytest.fixture
def helper_mnt(tmp_path, installed_commands) -> Path:
    """A mountpoint for mounts made through mount(8); unmounted afterwards if a test failed."""
    mnt = tmp_path / "ln"
    mnt.mkdir()
    yield mnt
    if is_mounted(mnt):
        force_unmount(mnt)
        wait_daemon_gone(mnt)


def test_fstab_mount_and_umount(volume, tmp_path, helper_mnt):
    mnt = helper_mnt
    replicas = ":".join(str(r) for r in volume.replicas)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"lnmirror {mnt} fuse.mount_lnmirror "
                     f"replica={replicas},key={volume.key},nofail,x-systemd.requires-mounts-for=/ 0 0\n")
    for attempt in range(2):
        proc = subprocess.run(["mount", "-T", str(fstab), str(mnt)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mnt)
        assert {"nosuid", "nodev"} <= mount_options_of(mnt)  # as for a direct mount
        if attempt == 0:
            (mnt / "config").write_text("network=bitcoin\n")
        else:
            assert (mnt / "config").read_text() == "network=bitcoin\n"
        assert lnmirror("status", str(mnt), check=False).returncode == 0
        assert subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0
        wait_daemon_gone(mnt)
    # mount -t form, as systemd's mount units call it
    proc = subprocess.run(["mount", "-t", "fuse.mount_lnmirror", "-o",
                           f"replica={replicas},key={volume.key}", "lnmirror", str(mnt)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (mnt / "config").read_text() == "network=bitcoin\n"
    assert {"nosuid", "nodev"} <= mount_options_of(mnt)
    subprocess.run(["umount", str(mnt)], check=True)
    wait_daemon_gone(mnt)


def test_mount_helper_refuses_non_empty_mountpoint_unless_nonempty(volume, helper_mnt):
    mnt = helper_mnt
    (mnt / "left-over").write_text("under the mount")
    options = f"replica={':'.join(str(r) for r in volume.replicas)},key={volume.key}"
    proc = subprocess.run(["mount", "-t", "fuse.mount_lnmirror", "-o", options, "lnmirror", str(mnt)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not is_mounted(mnt)
    assert proc.stderr.strip().splitlines() == [
        f"mount_lnmirror: mountpoint {mnt} is not empty (the mount would hide what is in it); "
        "empty it, or give -o nonempty"]
    proc = subprocess.run(["mount", "-t", "fuse.mount_lnmirror", "-o", options + ",nonempty",
                           "lnmirror", str(mnt)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(mnt) == []  # the volume, hiding the directory's own file
    (mnt / "config").write_text("network=bitcoin\n")
    subprocess.run(["umount", str(mnt)], check=True)
    wait_daemon_gone(mnt)
    assert os.listdir(mnt) == ["left-over"]


def test_config_file_and_status_wait(volume, tmp_path):
    mnt = tmp_path / "ln"
    mnt.mkdir()
    config = tmp_path / "node.toml"
    replicas = ", ".join(f'"{r}"' for r in volume.replicas)
    config.write_text(f'mountpoint = "{mnt}"\nreplicas = [{replicas}]\nkey_file = "{volume.key}"\n'
                      "deadline = 5\n")
    m = Mount(mnt, ["--config", str(config)])
    volume.mounts.append(m)
    # status --wait started before the mount: it waits for it (like ExecStartPre would)
    waiter = subprocess.Popen([sys.executable, "-m", "lnmirrorfs", "status", "--config",
                               str(config), "--wait", "30"], cwd=REPO, stdout=subprocess.PIPE)
    time.sleep(0.5)
    m.start()
    assert waiter.wait(40) == 0
    assert lnmirror("scrub", "--config", str(config), check=False).returncode == 0
    assert m.unmount() == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('replicas = "not-a-list"\n')
    proc = lnmirror("status", "--config", str(bad), check=False)
    assert proc.returncode == 2 and "replicas must be a list" in proc.stderr
    proc = lnmirror("status", str(mnt), "--wait", "1", check=False)
    assert proc.returncode == 2 and "no lnmirrorfs mount" in proc.stderr


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'(\w+)\{(.*)\} (\S+)', line)
        assert m, f"bad exposition line {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def test_hook_runs_on_real_fault_and_heal_and_prometheus_shows_it(make_vol, tmp_path):
    v = make_vol(n=3, k=1)
    events = tmp_path / "events"
    hook = f'echo "$LNMIRROR_EVENT $LNMIRROR_REPLICA" >> {events}'
    m = v.mount("--on-degraded", hook)
    (m.path / "a").write_text("before")
    away = v.replicas[2].with_name("away")
    os.rename(v.replicas[2], away)
    with open(m.path / "b", "w") as f:
        f.write("during")
        f.flush()
        os.fsync(f.fileno())
    wait_for(lambda: events.exists() and "faulted" in events.read_text())
    assert f"faulted {v.replicas[2]}" in events.read_text()
    proc = m.status("--prometheus")
    assert proc.returncode == 1
    samples = parse_prometheus(proc.stdout)
    vol = next(dict(labels)["volume"] for name, labels in samples if name == "lnmirror_volume_healthy")
    volume_labels = frozenset({("volume", vol), ("mountpoint", str(m.path))})
    assert samples[("lnmirror_volume_mounted", volume_labels)] == 1
    assert samples[("lnmirror_volume_healthy", volume_labels)] == 0
    state = volume_labels | {("replica", str(v.replicas[2])), ("state", "FAULTED")}
    assert samples[("lnmirror_replica_state", state)] == 1
    errors = volume_labels | {("replica", str(v.replicas[2])), ("kind", "write")}
    assert samples[("lnmirror_replica_errors_total", errors)] >= 0
    assert samples[("lnmirror_pending_heal", volume_labels)] >= 1
    os.rename(away, v.replicas[2])
    assert lnmirror("scrub", str(m.path), check=False).returncode in (0, 1)  # or the daemon
    wait_for(lambda: f"healed {v.replicas[2]}" in events.read_text())
    samples = parse_prometheus(m.status("--prometheus").stdout)
    assert samples[("lnmirror_volume_healthy", volume_labels)] == 1
    assert any(name == "lnmirror_last_scrub_timestamp_seconds" for name, _ in samples)
    assert m.unmount() == 0


def readme_prometheus_cron(mountpoint: Path, textfile_dir: Path) -> str:
    """The README's node_exporter cron line, as the shell command cron would run, aimed at
    this test's mount, textfile directory and commands."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if "--prometheus" in line and " root " in line)
    command = line.split(None, 6)[6]  # five time fields and the user
    for path, here in (("/home/bitcoin/.lightning", mountpoint),
                       ("/var/lib/node_exporter", textfile_dir),
                       ("/usr/local/bin/lnmirror", Path(VENV_BIN) / "lnmirror")):
        assert path in command
        command = command.replace(path, str(here))
    return command


def test_prometheus_cron_line_reports_mounted_and_unmounted(volume, tmp_path):
    textfiles = tmp_path / "node_exporter"
    textfiles.mkdir()
    mnt = tmp_path / "ln"
    mnt.mkdir()
    cron = readme_prometheus_cron(mnt, textfiles)
    labels = frozenset({("mountpoint", str(mnt))})

    def run_cron() -> dict:
        subprocess.run(["sh", "-c", cron], check=False, timeout=60)
        assert [p.name for p in textfiles.iterdir()] == ["lnmirror.prom"]  # no temp file left
        return parse_prometheus((textfiles / "lnmirror.prom").read_text())

    samples = run_cron()
    assert samples == {("lnmirror_volume_mounted", labels): 0, ("lnmirror_volume_healthy", labels): 0}
    proc = lnmirror("status", str(mnt), "--prometheus", check=False)
    assert proc.returncode == 1 and proc.stderr == "" and parse_prometheus(proc.stdout) == samples
    m = Mount(mnt, volume.replica_args())
    volume.mounts.append(m)
    m.start()
    samples = run_cron()
    vol = next(dict(labels)["volume"] for name, labels in samples if name == "lnmirror_volume_mounted")
    labels |= {("volume", vol)}
    assert samples[("lnmirror_volume_mounted", labels)] == 1
    assert samples[("lnmirror_volume_healthy", labels)] == 1
    assert lnmirror("status", str(mnt), "--prometheus", check=False).returncode == 0
    assert m.unmount() == 0
    assert run_cron()[("lnmirror_volume_mounted", frozenset({("mountpoint", str(mnt))}))] == 0


def make_lightning_dir(path: Path) -> None:
    path.mkdir()
    (path / "bitcoin").mkdir()
    secret = path / "bitcoin" / "hsm_secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o400)
    db = sqlite3.connect(path / "bitcoin" / "lightningd.sqlite3")
    db.execute("CREATE TABLE channels (id INTEGER PRIMARY KEY, state BLOB)")
    db.executemany("INSERT INTO channels VALUES (?, ?)", [(i, os.urandom(300)) for i in range(500)])
    db.commit()
    db.close()
    (path / "bitcoin" / "gossip_store").write_bytes(os.urandom(3 << 20))
    (path / "config").write_text("network=bitcoin\n")
    os.symlink("bitcoin/lightningd.sqlite3", path / "db-link")
    (path / "bitcoin" / "lightningd-bitcoin.pid").write_text("12345\n")


def tree_state(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in dirnames + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, p.read_bytes())
    return out


def test_import_existing_node_and_restore_byte_identical(tmp_path):
    source = tmp_path / "lightning"
    make_lightning_dir(source)
    replicas = [tmp_path / "r0", tmp_path / "r1"]
    for r in replicas:
        r.mkdir()
    key = tmp_path / "key"
    args = ["init", "--replica", str(replicas[0]), "--replica", str(replicas[1]),
            "--key-file", str(key), "--from", str(source)]
    # lightningd holds its pid file locked while it runs: refused, nothing created
    with open(source / "bitcoin" / "lightningd-bitcoin.pid", "r+") as pid:
        fcntl.lockf(pid, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-c", "import sys; from lnmirrorfs.cli import "
                               "lnmirror_main; sys.exit(lnmirror_main(sys.argv[1:]))", *args],
                              cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "lightningd is running" in proc.stderr
    assert not key.exists() and all(not os.listdir(r) for r in replicas)
    out = lnmirror(*args)
    assert "every file read back and verified" in out.stdout
    target = tmp_path / "restored"
    lnmirror("restore", "--replica", str(replicas[1]), "--key-file", str(key), str(target))
    assert tree_state(target) == tree_state(source)
    assert stat.S_IMODE(os.stat(target / "bitcoin" / "hsm_secret").st_mode) == 0o400


def readme_block(containing: str) -> str:
    """The indented code block of README.md that contains `containing`, as a shell script."""
    blocks, block = [], []
    for line in (REPO / "README.md").read_text().splitlines() + [""]:
        if line.startswith("    ") or (block and not line):
            block.append(line[4:])
        elif block:
            blocks.append("\n".join(block).strip() + "\n")
            block = []
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {containing!r}"
    return found[0]


def test_readme_systemd_install_block_installs_units_that_verify(tmp_path, installed_commands):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing: scripts/setup.sh installs systemd")
    root = tmp_path / "root"
    block = readme_block("lightningd.service.d")
    env = dict(os.environ, DESTDIR=str(root))
    subprocess.run(["bash", "-e", "-c", block], cwd=REPO, env=env, check=True)
    units = root / "etc" / "systemd" / "system"
    shipped = REPO / "contrib" / "systemd"
    for name in ("lnmirror@.service", "lnmirror-scrub@.service", "lnmirror-scrub@.timer"):
        assert (units / name).read_text() == (shipped / name).read_text()
    assert ((units / "lightningd.service.d" / "lnmirror.conf").read_text()
            == (shipped / "lightningd-needs-lnmirror.conf").read_text())
    config = root / "etc" / "lnmirrorfs" / "node.toml"
    assert config.read_text() == (shipped / "node.toml.example").read_text()
    for command in ("lnmirror", "mount_lnmirror"):
        link = root / "usr" / "local" / "bin" / command
        assert os.path.realpath(link) == os.path.realpath(Path(VENV_BIN) / command)
        assert subprocess.run([link, "--help"], capture_output=True).returncode == 0
    config.write_text("# edited by the operator\n")
    subprocess.run(["bash", "-e", "-c", block], cwd=REPO, env=env, check=True)  # again: fine
    assert config.read_text() == "# edited by the operator\n"
    # lightningd's own unit is not ours: a stand-in, to check the drop-in applies to it
    (units / "lightningd.service").write_text("[Service]\nExecStart=/bin/true\n")
    proc = subprocess.run([analyze, "cat-config", f"--root={root}", "systemd/system/lightningd.service"],
                          capture_output=True, text=True)
    assert "ExecStartPre=/usr/local/bin/lnmirror status" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([analyze, "verify", "--man=no", "lnmirror@node.service",
                           "lnmirror-scrub@node.service", "lnmirror-scrub@node.timer",
                           "lightningd.service"],
                          env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:"), cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        proc.stdout + proc.stderr
    proc = subprocess.run(["systemctl", f"--root={root}", "enable", "lnmirror@node.service",
                           "lnmirror-scrub@node.timer"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (units / "multi-user.target.wants" / "lnmirror@node.service").is_symlink()
    assert (units / "timers.target.wants" / "lnmirror-scrub@node.timer").is_symlink()


def test_checkout_script_without_virtualenv_says_what_to_run(tmp_path):
    checkout = tmp_path / "checkout"  # a checkout where scripts/setup.sh has not run yet
    checkout.mkdir()
    shutil.copy(REPO / "mount_lnmirror", checkout)
    shutil.copytree(REPO / "lnmirrorfs", checkout / "lnmirrorfs")
    # -S: no site-packages, so this Python lacks the dependencies whatever is installed
    proc = subprocess.run([sys.executable, "-S", str(checkout / "mount_lnmirror"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert re.fullmatch(r"mount_lnmirror: Python module '\w+' is missing: run `bash scripts/setup.sh` "
                        rf"\(as root\) in {re.escape(str(checkout))}, then use "
                        rf"{re.escape(str(checkout))}/\.venv/bin/mount_lnmirror\n", proc.stderr)
    # in a set-up checkout, any python3 runs it: the script switches to the checkout's .venv
    proc = subprocess.run(["python3", "-S", str(REPO / "mount_lnmirror"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mount_lnmirror"), proc.stderr


def process_running(pid: int) -> bool:
    """True unless gone or a zombie (an exited daemon whose new parent has not reaped it)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_status_wait_unmounted_returns_after_the_daemon_is_done(volume, tmp_path):
    mnt = tmp_path / "ln"
    mnt.mkdir()
    both = [str(mnt), *volume.replica_args()]
    subprocess.run(MOUNT + both, check=True, timeout=60)  # daemonized, like fstab
    try:
        data = os.urandom(8 << 20)
        (mnt / "gossip_store").write_bytes(data)  # left buffered: the unmount must flush it
        pid = int(next((tmp_path / "run").glob("*.lock")).read_text())
        proc = lnmirror("status", str(mnt), "--wait-unmounted", "1", check=False)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr == f"lnmirror: {mnt} is still in use after 1s: its control socket answers\n"
        # a second daemon for the same mountpoint is refused while the first serves it
        proc = subprocess.run(MOUNT + [*both, "-f", "-o", "nonempty"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(
            f"mount_lnmirror: {mnt} is still served by another mount_lnmirror (pid {pid})")
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        proc = lnmirror("status", str(mnt), "--wait-unmounted", "60", check=False)
        assert proc.returncode == 0, proc.stderr
    finally:
        force_unmount(mnt)
    assert not process_running(pid)  # the daemon has exited...
    for r in volume.replicas:  # ...and released every replica
        with open(r / "lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    out = tmp_path / "out"
    lnmirror("restore", *volume.replica_args(), str(out))
    assert (out / "gossip_store").read_bytes() == data


def test_systemd_unit_stop_commands_wait_for_the_daemon(volume, tmp_path):
    """lnmirror@.service's ExecStop= lines, run as systemd would (with $MAINPID and the
    config of instance %i), against a real daemon started like its ExecStart=."""
    mnt = tmp_path / "ln"
    mnt.mkdir()
    config = tmp_path / "node.toml"
    replicas = ", ".join(f'"{r}"' for r in volume.replicas)
    config.write_text(f'mountpoint = "{mnt}"\nreplicas = [{replicas}]\nkey_file = "{volume.key}"\n')
    unit = (REPO / "contrib" / "systemd" / "lnmirror@.service").read_text()
    stops = re.findall(r"^ExecStop=(.*)$", unit, flags=re.M)
    assert stops
    m = Mount(mnt, ["--config", str(config)])  # mount_lnmirror -f --config, as ExecStart=
    volume.mounts.append(m)
    m.start()
    data = os.urandom(1 << 20)
    (mnt / "lightningd.sqlite3").write_bytes(data)
    for line in stops:
        command = (line.replace("$MAINPID", str(m.proc.pid))
                   .replace("/etc/lnmirrorfs/%i.toml", str(config))
                   .replace("/usr/local/bin/", VENV_BIN + "/"))
        proc = subprocess.run(command.split(), capture_output=True, text=True, timeout=130)
        assert proc.returncode == 0, f"{command}: {proc.stdout}{proc.stderr}"
    assert m.proc.wait(5) == 0 and not is_mounted(mnt)  # gone, with a clean exit
    m.proc = None
    out = tmp_path / "out"
    lnmirror("restore", *volume.replica_args(), str(out))
    assert (out / "lightningd.sqlite3").read_bytes() == data
