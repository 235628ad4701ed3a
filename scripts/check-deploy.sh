#!/usr/bin/env bash
# Checks everything under deploy/ that cargo test does not:
#
#   scripts/check-deploy.sh            # check
#   scripts/check-deploy.sh --update   # also re-render deploy/helm/rendered/*.yaml
#
# - Prometheus rules: `promtool check rules` and the unit tests
#   (`promtool test rules deploy/prometheus/alerts_test.yaml`).
# - Helm chart: rendered for both modes, and with TLS, with Helm's engine (PyPI
#   helm-python-sdk), `helm lint --strict`, every manifest validated against
#   the Kubernetes schemas (PyPI kubernetes-validate, strict), the rendered
#   copies in deploy/helm/rendered/ up to date (scripts/check_chart.py).
# - The Dockerfile: multi-stage, slim non-root runtime with the three
#   binaries and the CLI's man pages and completion
#   (scripts/check_dockerfile.py; CI has no Docker daemon).
# - The Grafana dashboard: every panel query parses (promtool).
# - systemd: `systemd-analyze verify` of deploy/systemd/stratad.service (also
#   with its commented TLS lines enabled), and `systemd-analyze security`
#   keeping its exposure score at most 2.0.
#
# Installs what is missing: promtool is extracted from Debian's
# `prometheus` package (only the binary: installing the package would start
# a Prometheus server), the Python packages go into a virtualenv under
# ~/.cache. tests/tests/deploy.rs checks the metric names these files use.
set -euo pipefail
cd "$(dirname "$0")/.."

update=""
[ "${1:-}" = "--update" ] && update="--update"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/strata-deploy-check"
mkdir -p "$cache/bin"
export PATH="$cache/bin:$PATH"

if ! command -v promtool >/dev/null 2>&1; then
  echo "==> extracting promtool from Debian's prometheus package"
  tmp=$(mktemp -d)
  (
    cd "$tmp"
    apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
    dpkg-deb -x prometheus_*.deb root
  )
  cp "$tmp/root/usr/bin/promtool" "$cache/bin/promtool"
  rm -rf "$tmp"
fi

# Pinned: a new Helm engine or schema set changes the output on its own.
PY_PACKAGES=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 dockerfile==3.4.0)
venv="$cache/venv"
if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml, jsonschema, dockerfile' >/dev/null 2>&1 \
  || ! "$venv/bin/pip" freeze 2>/dev/null | grep -qx 'helm-python-sdk==0.2.2'; then
  echo "==> installing ${PY_PACKAGES[*]} into $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 keeps venv in its own package.
    rm -rf "$venv"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" pyyaml
fi

echo "==> promtool check rules"
promtool check rules deploy/prometheus/alerts.yaml
echo "==> promtool test rules"
promtool test rules deploy/prometheus/alerts_test.yaml

echo "==> helm chart: render, lint, validate"
"$venv/bin/python" scripts/check_chart.py $update

echo "==> Dockerfile (parsed by Docker's parser; no daemon needed)"
"$venv/bin/python" scripts/check_dockerfile.py

echo "==> grafana dashboard: every query parses (promtool)"
# The panel queries, with Grafana's variables filled in, as recording rules:
# promtool then parses each one as Prometheus would.
dash_rules=$(mktemp --suffix=.yaml)
python3 - deploy/grafana/strata.json "$dash_rules" <<'PY'
import json, sys
dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "expr" and isinstance(x, str):
                exprs.append(x)
            else:
                walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(dashboard["panels"])
rules = []
for i, e in enumerate(exprs):
    e = e.replace("$__rate_interval", "5m").replace("$sidecar_job", ".*").replace("$job", ".*").replace("$project", ".*")
    rules.append({"record": f"dashboard:query_{i}", "expr": e})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"dashboard {dashboard['title']!r}: {len(dashboard['panels'])} panels, {len(exprs)} queries")
PY
promtool check rules "$dash_rules" >/dev/null || { promtool check rules "$dash_rules"; rm -f "$dash_rules"; exit 1; }
rm -f "$dash_rules"

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "==> systemd-analyze verify"
  # verify resolves ExecStart; point it at a stand-in binary of the same name.
  unit_dir=$(mktemp -d)
  trap 'rm -rf "$unit_dir"' EXIT
  mkdir -p "$unit_dir/bin"
  printf '#!/bin/sh\n' >"$unit_dir/bin/stratad"
  chmod +x "$unit_dir/bin/stratad"
  sed "s#/usr/local/bin/stratad#$unit_dir/bin/stratad#" deploy/systemd/stratad.service >"$unit_dir/stratad.service"
  out=$(systemd-analyze verify "$unit_dir/stratad.service" 2>&1) || { echo "$out"; exit 1; }
  # verify exits 0 on some warnings (unknown keys); treat any line about our unit as a failure.
  if echo "$out" | grep -i "stratad.service" | grep -v "^$"; then
    exit 1
  fi
  # The commented-out TLS lines must stay valid once uncommented.
  mkdir -p "$unit_dir/tls"
  sed -e 's/^#LoadCredential=/LoadCredential=/' -e 's/^#Environment=/Environment=/' \
    "$unit_dir/stratad.service" >"$unit_dir/tls/stratad.service"
  grep -q '^LoadCredential=tls.key:' "$unit_dir/tls/stratad.service" || { echo "stratad.service: no TLS example lines"; exit 1; }
  out=$(systemd-analyze verify "$unit_dir/tls/stratad.service" 2>&1) || { echo "$out"; exit 1; }
  if echo "$out" | grep -i "stratad.service" | grep -v "^$"; then
    echo "stratad.service with its TLS lines uncommented: see above"
    exit 1
  fi
  # systemd's exposure score (0 best, 10 worst) stays at most 2.0.
  if ! systemd-analyze security --offline=yes --threshold=20 "$unit_dir/stratad.service" >/dev/null 2>&1; then
    systemd-analyze security --offline=yes "$unit_dir/stratad.service" | tail -3
    echo "stratad.service: exposure above 2.0"
    exit 1
  fi
  echo "stratad.service: ok ($(systemd-analyze security --offline=yes "$unit_dir/stratad.service" 2>/dev/null | grep -o 'exposure level.*'))"
else
  echo "==> systemd-analyze not found: skipping the unit check"
fi
echo "deploy checks passed"
