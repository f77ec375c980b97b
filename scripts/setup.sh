#!/usr/bin/env bash
# Sets up everything mixq needs on a fresh machine, in ./.venv.
# The pinned CPU torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[examples,test]"

# Chromium (Debian package chromium) for the headless-browser test of the HTML report (tests/test_report_html.py).
# Optional: without it that test is skipped (it fails under CI=true); setup goes on either way.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
        echo "setup: installing Chromium (Debian package chromium) for the HTML report's browser test"
        { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; } || true
    fi
    if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
        echo "setup: WARNING: Chromium could not be installed (apt-get install chromium);" >&2
        echo "  tests/test_report_html.py's browser test will be skipped (and fail under CI=true). Continuing." >&2
    fi
fi

# Fashion-MNIST for experiments/effnet_fashion.py: pip cannot install it; Debian packages it.
# $MIXQ_FASHION_MNIST may point at another folder holding the same four files.
FASHION_DIR=${MIXQ_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
FASHION_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
fashion_missing() {
    for f in $FASHION_FILES; do [ -f "$FASHION_DIR/$f" ] || return 0; done
    return 1
}
if fashion_missing; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
        echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist || true
    fi
    if fashion_missing; then
        echo "setup: ERROR: Fashion-MNIST is missing in $FASHION_DIR and could not be installed." >&2
        echo "  Install the Debian/Ubuntu package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)," >&2
        echo "  or put the four IDX .gz files ($FASHION_FILES) in a folder and set MIXQ_FASHION_MNIST to it." >&2
        echo "  Everything else is installed; only the effnet_fashion example needs these files." >&2
        exit 1
    fi
fi
