#!/bin/sh
# Every node: Docker from Debian, meshd and meshctl from the host's release build, the unit.
set -eu
export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null || ! command -v openssl >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io openssl
fi
for b in meshd meshctl; do
  src=/meshd/target/release/$b
  if [ ! -x "$src" ]; then
    echo "missing $src: run 'cargo build --release' at the repository root first" >&2
    exit 1
  fi
  install -m 0755 "$src" /usr/local/bin/$b
done
install -m 0644 /meshd/vagrant/meshd.service /etc/systemd/system/meshd.service
systemctl daemon-reload
