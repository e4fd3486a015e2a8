#!/usr/bin/env bash
# Validate docs/asyncapi.yaml with the official AsyncAPI parser (tools/asyncapi/validate.mjs).
# Installs the pinned node packages (npm ci, install scripts off) when they are missing or stale.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/tools/asyncapi"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "validate-asyncapi: node and npm are needed: sudo apt-get install -y nodejs npm" >&2
        exit 1
    fi
    echo "validate-asyncapi: installing nodejs and npm from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nodejs npm >/dev/null
fi

# npm ci writes node_modules/.package-lock.json; reinstall when the lock file is newer.
if [ ! -f "$tools/node_modules/.package-lock.json" ] ||
    [ "$tools/package-lock.json" -nt "$tools/node_modules/.package-lock.json" ]; then
    (cd "$tools" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi

exec node "$tools/validate.mjs" "${1:-$root/docs/asyncapi.yaml}"
