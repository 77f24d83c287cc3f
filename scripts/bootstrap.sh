#!/usr/bin/env bash
# Installs what sealbox needs on a fresh Debian 12 machine: the signing and
# verifying tools (apt-get, with sudo when not root) and a virtualenv in .venv.
# Idempotent: a stamp file records what was installed, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
APT_PACKAGES=(gnupg openssl osslsigncode openjdk-17-jdk-headless apksigner zipalign zip unzip)
TOOLS=(gpg gpgv openssl osslsigncode jarsigner keytool apksigner zipalign zip unzip)

stamp_of() { cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1; }

missing=()
for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing system tools (missing: ${missing[*]})"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

if [ -f .bootstrap-stamp ] && [ "$(cat .bootstrap-stamp)" = "$(stamp_of)" ] && [ -x .venv/bin/sealbox ]; then
    exit 0
fi
echo "bootstrap: creating the Python environment in .venv"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
stamp_of > .bootstrap-stamp
