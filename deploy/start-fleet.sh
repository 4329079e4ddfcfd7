#!/usr/bin/env bash
# Start N workers on each host over ssh, all against one Redis.
#   HOSTS="gpu1 gpu2 gpu3" WORKERS=2 ./deploy/start-fleet.sh
# Each host needs the repository at $REPO with its virtualenv, and deploy/worker.env as $ENVFILE.
set -euo pipefail
HOSTS=${HOSTS:?set HOSTS to the worker machines}
WORKERS=${WORKERS:-1}
CONCURRENCY=${CONCURRENCY:-4}
REPO=${REPO:-/opt/lightning-queue}
ENVFILE=${ENVFILE:-/etc/lightning-queue/worker.env}
for host in $HOSTS; do
  for i in $(seq 1 "$WORKERS"); do
    ssh "$host" "cd $REPO && set -a && . $ENVFILE && set +a && \
      nohup .venv/bin/lightning-queue worker --name w$i@%h --concurrency $CONCURRENCY \
      > /tmp/lightning-queue-w$i.log 2>&1 &"
    echo "started w$i on $host"
  done
done
