# shellcheck shell=bash
# Sourced by scripts/test, scripts/demo and scripts/bench: installs the
# system packages the local clusters need with apt-get when they are
# missing, and checks for Go and Rust, which must be on the machine.
#
#   ensure_prerequisites         control planes and MinIO: openssl, curl,
#                                python3 (with PyYAML), setsid
#   ensure_prerequisites node    also what a test node runs: containerd,
#                                runc, the CNI plugins, iproute2, iptables,
#                                conntrack, a static busybox for the test
#                                image, losetup/flock, objcopy and the CA
#                                bundle the Ferry image carries, and
#                                PostgreSQL for the database test image
ensure_prerequisites() {
  local missing=() pair
  local wanted=(openssl:openssl curl:curl python3:python3 setsid:util-linux)
  if [[ ${1:-} == node ]]; then
    wanted+=(containerd:containerd runc:runc ctr:containerd /usr/lib/cni/bridge:containernetworking-plugins
      ip:iproute2 iptables:iptables conntrack:conntrack losetup:mount flock:util-linux objcopy:binutils
      /etc/ssl/certs/ca-certificates.crt:ca-certificates /usr/lib/postgresql/15/bin/postgres:postgresql-15)
  fi
  for pair in "${wanted[@]}"; do
    local what=${pair%%:*}
    if [[ $what == /* ]]; then [[ -e $what ]] && continue; else command -v "$what" >/dev/null 2>&1 && continue; fi
    missing+=("${pair#*:}")
  done
  # The busybox image needs the static build (Debian's 'busybox' is linked
  # against the C library, which the image does not have).
  if [[ ${1:-} == node ]] && ! { [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1; }; then
    missing+=(busybox-static)
  fi
  if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    printf 'installing %s\n' "${missing[*]}" >&2
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # PyYAML is the YAML 1.1 reader the output round-trip tests read back with.
  if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    printf 'installing PyYAML\n' >&2
    python3 -m pip install --quiet pyyaml
  fi
  command -v go >/dev/null 2>&1 || { echo "Go is required to build the local clusters (https://go.dev/doc/install)" >&2; return 1; }
  command -v cargo >/dev/null 2>&1 || { echo "Rust is required (https://rustup.rs)" >&2; return 1; }
}
