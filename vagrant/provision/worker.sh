#!/bin/sh
# A worker: joins the swarm; meshd reads the manager's API over TCP with mutual TLS and this
# node's containers from the local engine.
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
install -d -m 0700 /etc/meshd/tls
install -m 0644 "$LAB/ca.pem" "$LAB/client.pem" /etc/meshd/tls/
install -m 0600 "$LAB/client-key.pem" /etc/meshd/tls/
cat > /etc/default/meshd <<ENV
MESHD_ARGS=--docker-host tcp://${MANAGER_IP}:2376 --tls-ca /etc/meshd/tls/ca.pem --tls-cert /etc/meshd/tls/client.pem --tls-key /etc/meshd/tls/client-key.pem --local-docker-host unix:///var/run/docker.sock --cgroup /sys/fs/cgroup/system.slice
ENV
systemctl enable --now meshd
systemctl restart meshd
