#!/usr/bin/env bash
# Headless Chromium for the dashboard test (Playwright drives it; Playwright never downloads a
# browser of its own here). Debian's `chromium` package; idempotent: does nothing when
# /usr/bin/chromium already exists.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$CHROMIUM is missing and there is no apt-get here: install Chromium there" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "$CHROMIUM is missing: run as root, or: sudo apt-get install -y --no-install-recommends chromium" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
[ -x "$CHROMIUM" ] || { echo "installing chromium gave no $CHROMIUM" >&2; exit 1; }
echo "installed $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
