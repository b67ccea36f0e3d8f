#!/bin/sh
# A worker: joins the swarm; meshd follows the managers' meshd (the feed, mutual TLS with the
# swarm's own node certificates) and reads this node's containers from the local engine. No
# credential for a manager's Docker API is on this machine.
set -eu
: "${NODE_IP:?}" "${MANAGER_IP:?}"
LAB=/vagrant/.lab
if [ ! -f "$LAB/worker-token" ]; then
  echo "no join token in $LAB: provision the manager first (vagrant up manager1)" >&2
  exit 1
fi
systemctl enable --now docker
if [ "$(docker info -f '{{.Swarm.LocalNodeState}}')" != active ]; then
  docker swarm join --advertise-addr "$NODE_IP" --token "$(cat "$LAB/worker-token")" \
    "$MANAGER_IP:2377"
fi
# meshd (installed and started by the package) learns this node's swarm role.
systemctl restart meshd
