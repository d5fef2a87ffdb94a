#!/usr/bin/env bash
# promtool (checks the alert rules and /metrics output in the tests), from Debian's
# `prometheus` package. Idempotent: does nothing when promtool is already on PATH.
# The package's service is not started (no init system runs it in a container or CI), and
# nothing of it is needed but /usr/bin/promtool.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is missing and there is no apt-get here: install Prometheus's promtool" \
    "(https://prometheus.io/download/) and put it on PATH" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "promtool is missing: run as root, or: sudo apt-get install -y --no-install-recommends prometheus" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends prometheus >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
command -v promtool >/dev/null 2>&1 || { echo "installing prometheus gave no promtool" >&2; exit 1; }
echo "installed $(promtool --version 2>&1 | head -n 1)"
