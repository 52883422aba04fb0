# shellcheck shell=bash
# Sourced by scripts/test, scripts/demo and scripts/bench: installs the
# system packages the local clusters need (openssl, curl, python3, setsid)
# with apt-get when they are missing, and checks for Go and Rust, which
# must be on the machine.
ensure_prerequisites() {
  local missing=() pair
  for pair in openssl:openssl curl:curl python3:python3 setsid:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if ((${#missing[@]})); then
    printf 'installing %s\n' "${missing[*]}" >&2
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"
  fi
  command -v go >/dev/null 2>&1 || { echo "Go is required to build the local clusters (https://go.dev/doc/install)" >&2; return 1; }
  command -v cargo >/dev/null 2>&1 || { echo "Rust is required (https://rustup.rs)" >&2; return 1; }
}
