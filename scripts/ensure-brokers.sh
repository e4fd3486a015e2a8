#!/usr/bin/env bash
# Install the brokers the bridge tests start privately (tests/bridges/), only when missing:
# nats-server (JetStream), mosquitto and rabbitmq-server from Debian's packages. Needs root.
set -euo pipefail

missing=()
command -v nats-server >/dev/null || missing+=(nats-server)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# The bridge tests run this one directly, as the caller (Debian's /usr/sbin wrapper would
# switch to the rabbitmq user): see bench/brokers.py.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-brokers: ${missing[*]} missing and we are not root; run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "ensure-brokers: installing ${missing[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
