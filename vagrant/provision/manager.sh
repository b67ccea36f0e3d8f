#!/bin/sh
# The manager: the swarm, and meshd reading the local engine and serving the feed to the
# workers' meshd on port 2378 (mutual TLS with the swarm's node certificates). Only the
# worker join token goes to the shared folder.
set -eu
: "${NODE_IP:?}"
LAB=/vagrant/.lab
mkdir -p "$LAB"
systemctl enable --now docker
if [ "$(docker info -f '{{.Swarm.LocalNodeState}}')" != active ]; then
  docker swarm init --advertise-addr "$NODE_IP"
fi
docker swarm join-token -q worker > "$LAB/worker-token"
# meshd (installed and started by the package) learns this node's swarm role.
systemctl restart meshd
