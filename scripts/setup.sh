#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (CPU build) first, so the project's own `torch>=...`
# requirement is already met and pip does not pull CUDA packages; then stabwatch with its dev extras;
# then the SNN libraries that declare torchvision (no CPU build here) without their declared deps;
# then Chromium for the browser checks of the HTML reports (Debian, when run as root with apt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# spikingjelly / norse: --no-deps (they declare torchvision, which has no CPU build here), plus what
# they really import: spikingjelly -> loguru; norse -> nir, nirtorch; nir -> h5py. norse 1.1.0 is an
# sdist built with setuptools_scm.
"$PY" -m pip install -q setuptools_scm loguru h5py
"$PY" -m pip install -q --no-deps --no-build-isolation "spikingjelly==2.0.0" "norse==1.1.0" nir nirtorch \
  || echo "setup: spikingjelly/norse not installed; their tests will be skipped" >&2
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium not installed; browser checks of reports will be skipped" >&2
fi
echo "setup: done"
