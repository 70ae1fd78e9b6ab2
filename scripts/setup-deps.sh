#!/usr/bin/env bash
# What `make test` and `make demo` need beyond the Python packages, on a Debian machine with
# PostgreSQL and RabbitMQ running: Dovecot (the IMAP server of tests and demo) and RabbitMQ's
# management plugin (its HTTP API creates the tests' private vhosts; its UI is how operators watch)
# and Web-STOMP plugin (real-time notifications).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
    echo "installing dovecot-imapd from Debian..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dovecot-imapd >/dev/null
fi

if [ "${WITH_MBSYNC:-0}" = "1" ] && ! command -v mbsync >/dev/null 2>&1; then
    echo "installing isync (mbsync) for the benchmark's comparison..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq isync >/dev/null
fi

# Web-STOMP carries real-time notifications to browsers (it brings the STOMP plugin with it).
if command -v rabbitmq-plugins >/dev/null 2>&1; then
    enabled=$(rabbitmq-plugins list -e -m 2>/dev/null || true)
    for plugin in rabbitmq_management rabbitmq_web_stomp; do
        if ! grep -qx "$plugin" <<<"$enabled"; then
            echo "enabling RabbitMQ's $plugin plugin..."
            $SUDO rabbitmq-plugins enable "$plugin" >/dev/null
        fi
    done
fi

# Wait for the management API (it starts a few seconds after the plugin is enabled).
for _ in $(seq 1 60); do
    if curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
echo "RabbitMQ's management API does not answer on 127.0.0.1:15672" >&2
exit 1
