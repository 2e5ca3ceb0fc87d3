#!/usr/bin/env bash
# What `make test` needs besides Python packages:
#   - Chromium at /usr/bin/chromium (the browser tests, through Playwright);
#   - redis-server (each Celery-on-Redis test starts its own on a free port);
#   - RabbitMQ answering on 127.0.0.1:5672 as guest/guest (the Celery-on-RabbitMQ test).
# As root (CI, a container) it installs what is missing with apt-get and starts RabbitMQ.
# Otherwise it says what to install; the tests needing it are then skipped, each with that
# reason (with CI=true they fail instead, so CI never passes without them).
set -uo pipefail

root=false
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && root=true
updated=false
missing=()

install() {  # apt packages
  if ! $updated; then
    apt-get update -qq && updated=true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ ! -x /usr/bin/chromium ]; then
  if $root; then echo "installing Chromium"; install chromium; else missing+=(chromium); fi
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if $root; then echo "installing redis-server"; install redis-server; else missing+=(redis-server); fi
fi

if ! port_open 5672; then
  if $root; then
    command -v rabbitmq-server >/dev/null 2>&1 || { echo "installing RabbitMQ"; install rabbitmq-server; }
    echo "starting RabbitMQ"
    rabbitmq-server -detached
    for _ in $(seq 240); do port_open 5672 && break; sleep 0.5; done  # up to 2 minutes
    port_open 5672 || echo "RabbitMQ did not open 127.0.0.1:5672 within 2 minutes" >&2
  else
    missing+=(rabbitmq-server)
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "Not installed or not running: ${missing[*]}. Their tests will be skipped." >&2
  echo "To run them: sudo apt-get install ${missing[*]}" >&2
  [[ " ${missing[*]} " == *" rabbitmq-server "* ]] && \
    echo "  (and start RabbitMQ on 127.0.0.1:5672: sudo systemctl start rabbitmq-server)" >&2
fi
exit 0
