#!/usr/bin/env bash
# Start the local PostgreSQL and Redis the integration tests use, when they are installed
# but stopped. Where they are not installed, the tests that need them skip with a reason,
# unless REQUIRE_SERVICES=1 (CI), which turns their absence into a failure.
set -u

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! answers 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
if ! answers 6379; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  fi
fi
for _ in $(seq 1 30); do
  answers 5432 && break
  sleep 0.5
done
if ! answers 5432; then
  echo "PostgreSQL is not available at 127.0.0.1:5432: its tests will skip (fail under REQUIRE_SERVICES=1)"
fi
exit 0
