"""A replica on a real network mount: sshfs to an sshd in a network namespace of our own,
cut with an nft drop rule (the veth link stays up: taking it down leaves writers in D state).

The mount must keep serving with the other replicas, mark the network replica FAULTED after
the deadline, lose nothing, and scrub must heal it once the network is back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

import workload
from conftest import force_unmount, is_mounted, lnmirror, make_volume

# Link-local addresses on a veth pair between this namespace and one the test creates.
HOST_IP, PEER_IP, PORT = "169.254.77.1", "169.254.77.2", "2222"
DEADLINE = 3.0

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("sshfs", "sshd", "nft")),
                                reason="needs sshfs, openssh-server and nftables "
                                       "(scripts/setup.sh installs them)")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class SshReplicaHost:
    """An sshd in its own network namespace, and an sshfs mount of one of its directories."""

    def __init__(self, root) -> None:
        self.root = root
        self.ns = f"lnm{os.getpid()}"
        self.veth = f"lnmh{os.getpid() % 100000}"
        self.remote = root / "remote"
        self.mountpoint = root / "sshfs"
        self.remote.mkdir(parents=True)
        self.mountpoint.mkdir()
        self.sshd = None
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "lnmpeer", "netns",
           self.ns)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        self._in_ns("ip", "addr", "add", f"{PEER_IP}/24", "dev", "lnmpeer")
        self._in_ns("ip", "link", "set", "lnmpeer", "up")
        self._in_ns("ip", "link", "set", "lo", "up")
        self._start_sshd()
        self.connect()

    def _in_ns(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *args, check=check)

    def _start_sshd(self) -> None:
        keys = self.root / "keys"
        keys.mkdir()
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client"))
        shutil.copy(keys / "client.pub", keys / "authorized_keys")
        self.identity = keys / "client"
        config = self.root / "sshd_config"
        config.write_text(f"Port {PORT}\nListenAddress {PEER_IP}\nHostKey {keys / 'host'}\n"
                          f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin yes\n"
                          "PasswordAuthentication no\nStrictModes no\nUsePAM no\n"
                          f"PidFile {self.root / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = subprocess.Popen(["ip", "netns", "exec", self.ns, shutil.which("sshd"), "-D",
                                      "-e", "-f", str(config)], stderr=subprocess.DEVNULL)

    def connect(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            proc = sh("sshfs", f"root@{PEER_IP}:{self.remote}", str(self.mountpoint), "-p", PORT,
                      "-o", f"IdentityFile={self.identity},StrictHostKeyChecking=no,"
                      "UserKnownHostsFile=/dev/null,ServerAliveInterval=1,ServerAliveCountMax=3,"
                      "BatchMode=yes", check=False)
            if proc.returncode == 0 and is_mounted(self.mountpoint):
                return
            assert time.monotonic() < deadline, f"sshfs did not mount: {proc.stderr}"
            time.sleep(0.3)

    def cut(self) -> None:
        self._in_ns("nft", "add", "table", "inet", "lnmcut")
        self._in_ns("nft", "add", "chain", "inet", "lnmcut", "input",
                    "{ type filter hook input priority 0; }")
        self._in_ns("nft", "add", "rule", "inet", "lnmcut", "input", "tcp", "dport", PORT, "drop")

    def restore_network(self) -> None:
        self._in_ns("nft", "delete", "table", "inet", "lnmcut", check=False)

    def reconnect(self) -> None:
        """The cut killed the sshfs session (ServerAlive): mount it again, as an operator would."""
        force_unmount(self.mountpoint)
        self.connect()

    def close(self) -> None:
        self.restore_network()
        force_unmount(self.mountpoint)
        # Every process in the namespace: sshd and its per-session children, including the
        # one whose client vanished behind the cut (it would keep a copy of the host's mount
        # table, and with it other FUSE mounts, alive in the namespace sshd was started in).
        pids = sh("ip", "netns", "pids", self.ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        if self.sshd is not None:
            self.sshd.wait(10)
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.veth, check=False)


@pytest.fixture
def ssh_host(tmp_path):
    host = SshReplicaHost(tmp_path / "net")
    yield host
    host.close()


def replica_states(m) -> list[str]:
    return [r["state"] for r in json.loads(m.status("--json").stdout)["replicas"]]


def test_sshfs_replica_cut_and_healed(tmp_path, ssh_host):
    (tmp_path / "net" / "sshfs" / "replica").mkdir()
    v = make_volume(tmp_path / "vol", n=3, k=1, replica_paths=[
        tmp_path / "a", tmp_path / "b", ssh_host.mountpoint / "replica"])
    m = v.mount("--deadline", str(DEADLINE))
    try:
        workload.run(str(m.path), 10)
        ssh_host.cut()
        started = time.monotonic()
        workload.run(str(m.path), 10)  # W = 2 local replicas carry on
        assert time.monotonic() - started < 30
        time.sleep(DEADLINE + 1)
        assert replica_states(m) == ["ONLINE", "ONLINE", "FAULTED"]
        assert workload.check_db(str(m.path)) == 20
        ssh_host.restore_network()
        ssh_host.reconnect()
        proc = lnmirror("scrub", str(m.path), "--json", check=False)
        # 1 if the scrub healed it, 0 if the daemon had caught it up on its own already
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        assert replica_states(m) == ["ONLINE"] * 3
        assert m.unmount() == 0
        out = tmp_path / "out"
        v.restore(out, replicas=[v.replicas[2], v.replicas[0]])
        assert workload.check_db(str(out)) == 20
    finally:
        for mount in v.mounts:
            mount.kill()


def test_sqlite_rides_through_a_20s_network_cut_on_two_replicas(tmp_path, ssh_host):
    """n=2, W=2, B on sshfs: the network is cut for 20 s.  Commits wait (no error), B is
    caught up once sshfs is back, and the volume ends ONLINE without a remount."""
    (tmp_path / "net" / "sshfs" / "replica").mkdir()
    v = make_volume(tmp_path / "vol", n=2, k=1, replica_paths=[
        tmp_path / "a", ssh_host.mountpoint / "replica"])
    m = v.mount("--deadline", str(DEADLINE))
    try:
        workload.run(str(m.path), 5)
        loop = workload.CommitLoop(str(m.path))
        time.sleep(1)
        ssh_host.cut()
        time.sleep(20)
        ssh_host.restore_network()
        ssh_host.reconnect()
        deadline = time.monotonic() + 60
        while replica_states(m) != ["ONLINE", "ONLINE"] or loop.acked < 30:
            assert time.monotonic() < deadline and not loop.errors, f"{loop.errors}\n{m.output()}"
            time.sleep(0.5)
        loop.stop()
        assert not loop.errors, loop.errors
        print(f"{loop.acked} commits, none failed; the slowest took {loop.slowest:.1f}s")
        assert loop.slowest > 15  # it did wait through the cut
        assert workload.check_db(str(m.path)) == 5 + loop.acked
        assert m.unmount() == 0
        out = tmp_path / "out"
        v.restore(out, replicas=[v.replicas[1]])
        assert workload.check_db(str(out)) == 5 + loop.acked
    finally:
        for mount in v.mounts:
            mount.kill()
