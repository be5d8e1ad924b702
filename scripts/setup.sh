#!/usr/bin/env bash
# Set up voxloop on a fresh Debian machine: system packages (speech synthesis for tests and the
# corpus; Prometheus and promtool for the metrics tests; PostgreSQL and HAProxy for the store and
# scale-out tests, which start throwaway servers of their own; chromium and its driver for the web
# page's browser tests), a virtual environment in .venv, and the package with every extra. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng flite sox fortunes fortunes-min prometheus postgresql haproxy chromium chromium-driver)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: done (.venv ready; try: .venv/bin/voxloop --help)"
