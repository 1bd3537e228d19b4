#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: lint, then pytest on real mounts.
# LNMIRROR_SLOW=1 also runs the slow soak and benchmark tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
