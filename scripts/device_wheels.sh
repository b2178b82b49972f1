#!/usr/bin/env bash
# Run here (with network), before a device run: downloads the one package the GPU image lacks
# (ml_collections, pure Python) into .whl/, which git ignores and the device tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3.12 -m pip download -q --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
ls .whl
