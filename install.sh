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
.venv/bin/pip install -q -e '.[test]'
echo "installed: .venv/bin/d-pull, .venv/bin/d-run, .venv/bin/d-cache"
