#!/bin/sh
# The manager: its Docker API also on TCP with mutual TLS (workers' meshd read it), the
# swarm, and meshd reading the local engine.
set -eu
: "${NODE_IP:?}"
LAB=/vagrant/.lab
mkdir -p "$LAB"
sh /meshd/vagrant/provision/tls.sh /etc/docker/tls "$NODE_IP"
install -m 0644 /etc/docker/tls/ca.pem /etc/docker/tls/client.pem "$LAB/"
install -m 0600 /etc/docker/tls/client-key.pem "$LAB/"
mkdir -p /etc/systemd/system/docker.service.d
cat > /etc/systemd/system/docker.service.d/meshd-lab.conf <<UNIT
[Service]
ExecStart=
ExecStart=/usr/sbin/dockerd -H fd:// -H tcp://${NODE_IP}:2376 --tlsverify --tlscacert=/etc/docker/tls/ca.pem --tlscert=/etc/docker/tls/server.pem --tlskey=/etc/docker/tls/server-key.pem --containerd=/run/containerd/containerd.sock
UNIT
systemctl daemon-reload
systemctl restart docker
if [ "$(docker info -f '{{.Swarm.LocalNodeState}}')" != active ]; then
  docker swarm init --advertise-addr "$NODE_IP"
fi
docker swarm join-token -q worker > "$LAB/worker-token"
# Debian 12 is pure cgroup2 and Docker uses the systemd driver: containers live under
# system.slice. Sockets of processes meshd does not know pass through untouched.
cat > /etc/default/meshd <<ENV
MESHD_ARGS=--docker-host unix:///var/run/docker.sock --cgroup /sys/fs/cgroup/system.slice
ENV
systemctl enable --now meshd
systemctl restart meshd
