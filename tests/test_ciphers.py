"""Each cipher on a real mount: the header names it, status shows it, a SQLite workload and
a restore go through it; replicas whose headers disagree on it are refused."""

from __future__ import annotations

import json

import pytest

import workload
from conftest import lnmirror
from lnmirrorfs import codec, format
from lnmirrorfs.cli.common import read_key_file


@pytest.mark.parametrize("cipher", list(codec.CIPHERS.values()), ids=lambda c: c.name)
def test_a_volume_of_each_cipher_mounts_commits_and_restores(make_vol, tmp_path, cipher):
    v = make_vol(extra=("--cipher", cipher.name))
    for r in v.replicas:
        assert format.Header.unpack((r / format.HEADER_NAME).read_bytes()).aead == cipher
    m = v.mount()
    assert workload.run(str(m.path), 20) == 20
    status = json.loads(m.status("--json").stdout)
    assert status["cipher"] == cipher.name
    assert f"cipher={cipher.name}" in m.status().stdout
    assert m.unmount() == 0
    v.restore(tmp_path / "restored")
    assert workload.check_db(str(tmp_path / "restored")) == 20


def test_replicas_whose_headers_name_other_ciphers_are_refused(make_vol):
    """Headers that authenticate but name different ciphers (only the key's holder can
    write one) are refused outright, in one line: no replica is read with the wrong one."""
    a = make_vol(name="a", extra=("--cipher", "aegis256"))
    keys = codec.Keys.derive(read_key_file(str(a.key)))
    replica = a.replicas[1]
    header = format.Header.unpack((replica / format.HEADER_NAME).read_bytes())
    other = format.Header(header.volume_id, header.k, header.n, header.share_index,
                          header.block_size, header.key_check, codec.XCHACHA20.id)
    path = replica / format.HEADER_NAME
    path.chmod(0o600)
    path.write_bytes(other.pack(keys))
    proc = lnmirror("status", *a.replica_args(), check=False)
    assert proc.returncode != 0
    assert "disagrees" in proc.stderr and "cipher" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
