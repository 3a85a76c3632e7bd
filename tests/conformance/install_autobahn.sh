#!/usr/bin/env bash
# Installs Autobahn|Testsuite (`wstest`, Python 2.7 only) from what this project reaches: the
# machine image's CPython 2.7 (pyenv) or else Debian bullseye's (bookworm has none), the suite
# and its pinned Python 2.7 dependencies from PyPI. Idempotent (about 30 s the first time);
# prints the path of `wstest` on its last line. tests/test_conformance.py runs it from there.
#
#   bash tests/conformance/install_autobahn.sh        # as root (apt-get)
#   AUTOBAHN_HOME=/somewhere bash tests/conformance/install_autobahn.sh
set -euo pipefail

AUTOBAHN_HOME="${AUTOBAHN_HOME:-/opt/sigmax-autobahn}"
SUITE_VERSION="25.10.1"  # the last release; still Python 2.7 code with pinned dependencies
PIP_FOR_PY27="20.3.4"    # the last pip that runs on Python 2.7
WSTEST="$AUTOBAHN_HOME/bin/wstest"

if [ -x "$WSTEST" ] && "$WSTEST" --help >/dev/null 2>&1; then
  echo "$WSTEST"
  exit 0
fi

# A CPython 2.7: the one given, the machine's (pyenv's, where the image has one), else Debian's.
find_python27() {
  for candidate in "${PYTHON27:-}" /usr/bin/python2.7 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import ssl, zlib' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! PY27="$(find_python27)"; then
  # A private source list: bullseye (the last Debian with Python 2.7) is consulted for this
  # install only; every package that bookworm has still comes from bookworm.
  lists="$(mktemp -d)"
  mkdir -p "$lists/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main" \
    > "$lists/bullseye.list"
  apt_options=(-o "Dir::Etc::sourcelist=$lists/bullseye.list" -o "Dir::State::Lists=$lists")
  apt-get update -qq "${apt_options[@]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${apt_options[@]}" python2.7 libpython2.7-dev
  rm -rf "$lists"
  PY27=/usr/bin/python2.7
fi

PY3="${PYTHON3:-python3}"
downloads="$(mktemp -d)"
"$PY3" -m pip download --quiet --no-deps --only-binary=:all: --python-version 2.7 \
  --implementation cp --abi none --platform any -d "$downloads" "pip==$PIP_FOR_PY27"
pip_wheel="$(ls "$downloads"/pip-*.whl)"

# Python 2.7's pip installs itself from its wheel, then the suite, into a folder of their own;
# the machine's pip configuration (constraints for Python 3 packages) does not apply to them.
site="$("$PY27" -c 'import sys; print("lib/python%d.%d/site-packages" % sys.version_info[:2])')"
export PYTHONPATH="$AUTOBAHN_HOME/$site" PIP_CONFIG_FILE=/dev/null
mkdir -p "$AUTOBAHN_HOME"
"$PY27" "$pip_wheel/pip" install --quiet --no-warn-script-location --prefix "$AUTOBAHN_HOME" \
  "$pip_wheel"
# setuptools first: the suite's dependencies that come as sources build with it (the
# interpreter may have none of its own); 44.0.0 is the suite's pin.
"$PY27" -m pip install --quiet --no-warn-script-location --prefix "$AUTOBAHN_HOME" \
  "setuptools==44.0.0" "wheel==0.37.1"
"$PY27" -m pip install --quiet --no-warn-script-location --prefix "$AUTOBAHN_HOME" \
  "autobahntestsuite==$SUITE_VERSION"
rm -rf "$downloads"

# addsitedir, not PYTHONPATH: zope.interface is a namespace package set up by a .pth file.
cat > "$WSTEST" <<WRAPPER
#!/bin/sh
exec "$PY27" -c "import site; site.addsitedir('$AUTOBAHN_HOME/$site'); from autobahntestsuite.wstest import run; run()" "\$@"
WRAPPER
chmod +x "$WSTEST"
"$WSTEST" --help >/dev/null
echo "$WSTEST"
