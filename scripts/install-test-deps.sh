#!/usr/bin/env bash
# Install everything the test suite needs: Python packages and Debian's prometheus, alertmanager,
# chromium, docker-compose and haproxy (the tests start real servers and a real browser, and check
# the deployment's configs). Idempotent; needs root (or sudo) for apt-get.
set -euo pipefail

debian_packages=(prometheus prometheus-alertmanager chromium docker-compose haproxy)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y --no-install-recommends "${missing[@]}"
fi

python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -r requirements-dev.txt
