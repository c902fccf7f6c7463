#!/bin/sh
# Install d-utils and everything its tests use on Debian 12 or newer: system tools with apt-get,
# the package (editable, with its test extras) into ./.venv. Run from the repository's root.
set -eu
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    bubblewrap passt busybox-static docker-registry skopeo umoci buildah podman nginx-light openssl time \
    python3-venv python3-pip tmux debootstrap zstd ca-certificates uidmap strace >/dev/null
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# compat: the tree's path in a .pth file. setuptools' default for this layout, an import finder, imports pathlib (and
# with it re, urllib.parse...) at every start of the venv's Python: 17 ms of each d-run, d-pull and test process.
# (setuptools prints that compat is transitional: if it goes, drop the option and pay those 17 ms.)
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
echo "installed: .venv/bin/d-pull, .venv/bin/d-run, .venv/bin/d-cache"
