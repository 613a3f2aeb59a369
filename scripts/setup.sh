#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with sdgraph installed (editable).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   plus the test tools (pytest, torch CPU, diffusers, transformers, ruff,
#                                  ComfyUI clients, Playwright and Debian's chromium for the web-UI test)
# On Linux it also installs OpenBLAS when it can (MLX's CPU wheel ships a slow reference BLAS).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.*\.so\.0'; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
          || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1)) \
          || echo "setup: could not install OpenBLAS; MLX will use its slow reference BLAS on the CPU" >&2
    else
        echo "setup: for fast CPU runs install OpenBLAS: sudo apt-get install libopenblas0-pthread" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# -qq: errors only (pip's and setuptools' advisory warnings are noise to a newcomer); failures still print
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
.venv/bin/python -m pip install -qq --upgrade pip >/dev/null
echo "setup: installing sdgraph${extras:+ with the test tools} into .venv (a minute or two) ..."
.venv/bin/python -m pip install -qq -e ".${extras}"
if [ -n "$extras" ]; then
    # spandrel (the upscale models' reference) without its dependencies: they would pull a torchvision (and
    # with it another torch) that does not load beside the pinned torch; the tests stub what it imports
    .venv/bin/python -m pip install -qq --no-deps "spandrel>=0.4"
    # the web-UI test drives Debian's chromium (Playwright with executable_path: no browser download);
    # installed quietly where apt-get may be used without a password, else one line; never a failure
    if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
        as_root=""
        [ "$(id -u)" = "0" ] || { sudo -n true 2>/dev/null && as_root="sudo -n"; } || as_root="no"
        if [ "$as_root" != "no" ] && command -v apt-get >/dev/null; then
            export DEBIAN_FRONTEND=noninteractive
            ($as_root apt-get install -y -q chromium >/dev/null 2>&1 \
              || ($as_root apt-get update -q >/dev/null 2>&1 && $as_root apt-get install -y -q chromium >/dev/null 2>&1)) \
              || echo "setup: could not install chromium; tests/test_serve_ui.py (ComfyUI's web UI) will be skipped" >&2
        else
            echo "setup: no chromium: tests/test_serve_ui.py (ComfyUI's web UI) will be skipped;" \
                 "to run it: sudo apt-get install chromium" >&2
        fi
    fi
fi
echo "setup: done. Run: .venv/bin/sdgraph --help"
