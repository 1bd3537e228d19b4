#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then creates a demo volume with two replica directories and a
# generated key under /tmp/lnmirror-demo and mounts it at /tmp/lnmirror-demo/mnt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
demo=${LNMIRROR_DEMO_DIR:-/tmp/lnmirror-demo}
export PATH="$PWD/.venv/bin:$PATH"
if mountpoint -q "$demo/mnt"; then
  echo "demo already mounted at $demo/mnt"
else
  if [ ! -e "$demo/replica-a/lnmirror.hdr" ]; then
    rm -rf "$demo"
    mkdir -p "$demo/replica-a" "$demo/replica-b" "$demo/mnt"
    lnmirror init --replica "$demo/replica-a" --replica "$demo/replica-b" --key-file "$demo/key"
  fi
  mount_lnmirror "$demo/mnt" --replica "$demo/replica-a" --replica "$demo/replica-b" \
    --key-file "$demo/key"
  echo "hello from lnmirrorfs" > "$demo/mnt/hello.txt"
  sync "$demo/mnt/hello.txt"
fi
cat <<MSG

lnmirrorfs demo is mounted at $demo/mnt (replicas: $demo/replica-a, $demo/replica-b).
  look:     ls -la $demo/mnt; cat $demo/mnt/hello.txt
  health:   $PWD/.venv/bin/lnmirror status $demo/mnt
  replicas hold only ciphertext:  grep -r hello $demo/replica-a || echo 'no plaintext'
  unmount:  fusermount3 -u $demo/mnt && $PWD/.venv/bin/lnmirror status $demo/mnt --wait-unmounted 60
            (the second command returns once the daemon has written its snapshot and exited)
MSG
