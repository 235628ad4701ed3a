#!/usr/bin/env bash
# Runs every check and test of the workspace, installing what they need first.
#
#   ./scripts/test.sh
#
# Used as-is by CI (.ci/run). Steps: install missing system packages, check
# formatting, clippy with warnings as errors, rustdoc, the deploy/ checks
# (scripts/check-deploy.sh installs promtool and its Python tools itself),
# build every binary (the
# end-to-end tests start the real `stratad`), then `cargo test` for the whole
# workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the build and tests need, as `check:debian-package`; the
# check is a command name, or an absolute path to a file the package
# installs. Our own protos compile with protox; etcd-client (used by
# strata-benches' subscriber-bench) runs protoc at build time and needs the
# well-known types, and subscriber-bench starts a real etcd 3.4. The etcd
# backend's tests start etcd clusters too, and make TLS certificates with
# openssl.
REQUIRED_TOOLS=(
  etcd:etcd-server
  protoc:protobuf-compiler
  /usr/include/google/protobuf/timestamp.proto:libprotobuf-dev
  openssl:openssl
)

missing=()
for entry in "${REQUIRED_TOOLS[@]}"; do
  check="${entry%%:*}"
  if [[ "$check" == /* ]]; then
    [ -e "$check" ] || missing+=("${entry#*:}")
  else
    command -v "$check" >/dev/null 2>&1 || missing+=("${entry#*:}")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  echo "==> installing rustfmt and clippy"
  rustup component add rustfmt clippy
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

echo "==> module layers (no import cycles; server, SDK and CLI imports only go down their layers)"
python3 scripts/check-layers.py \
  --crate server --layers server/layers.txt \
  --crate client-sdk --layers client-sdk/layers.txt \
  --crate cli --layers cli/layers.txt \
  --crate sidecar

echo "==> deploy/ checks (promtool rules and unit tests, Helm chart render + Kubernetes schemas, dashboard queries, systemd unit)"
scripts/check-deploy.sh

echo "==> cargo build --bins --examples"
cargo build --workspace --bins --examples --locked

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
