#!/usr/bin/env bash
# Installs what lnmirrorfs needs on Debian/Ubuntu (run as root): FUSE 3, a virtualenv in
# .venv with the package and its test tools.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and mounts FUSE filesystems)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
need=""
for pkg in fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev sqlite3 strace util-linux systemd sshfs openssh-server nftables iproute2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
  apt-get update -qq
  apt-get install -y -qq $need >/dev/null
fi
[ -e /dev/fuse ] || { echo "setup.sh: /dev/fuse is missing: this machine cannot mount FUSE" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
