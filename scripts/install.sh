#!/usr/bin/env bash
# Installs each Debian package named whose program is missing (as root, with apt-get):
#   scripts/install.sh chromium pgbouncer
# The program looked for is the package's name, also under /usr/sbin.
set -euo pipefail
missing=()
for pkg in "$@"; do
  command -v "$pkg" >/dev/null || [ -x "/usr/sbin/$pkg" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install.sh: missing ${missing[*]}: install Debian's packages ${missing[*]}" >&2
  exit 1
fi
echo "install.sh: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
