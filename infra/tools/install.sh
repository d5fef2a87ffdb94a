#!/usr/bin/env bash
# The deployment checkers the tests run: helm (lint, template) and kubeconform (Kubernetes and
# KEDA schemas), built with `go install` from the Go module proxy into ~/.cache/sluice/bin.
# Idempotent: a binary already built at the pinned version is kept (a stamp file records it).
# Prints the folder to put on PATH. Needs Go >= 1.24 on PATH.
#
#   bash infra/tools/install.sh          # build what is missing
#   export PATH="$(bash infra/tools/install.sh):$PATH"
set -euo pipefail

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.7.0
BIN="$HOME/.cache/sluice/bin"
mkdir -p "$BIN"

build() {  # name module version
  local name=$1 module=$2 version=$3
  if [ -x "$BIN/$name" ] && [ "$(cat "$BIN/$name.version" 2>/dev/null)" = "$version" ]; then
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "$name is missing and there is no Go toolchain here: install Go (>= 1.24) first" >&2
    exit 1
  fi
  echo "building $name $version with go install (once; cached in $BIN)" >&2
  GOBIN="$BIN" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 go install "$module@$version" >&2
  echo "$version" > "$BIN/$name.version"
}

build helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
echo "$BIN"
