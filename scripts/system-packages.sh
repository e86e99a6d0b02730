#!/usr/bin/env bash
# The Debian packages that tests and scripts start as real components: prometheus (the
# dashboard-query check in tests/serve/test_serve_integration.py) and chromium (headless, for
# scripts/dashboard_screenshots.py). Installs the missing ones with apt-get (as root, or with
# sudo); elsewhere it says what to install and leaves the rest to you.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-packages: install ${need[*]} with your package manager (tests start them)" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-packages: installing ${need[*]} (Debian packages)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
