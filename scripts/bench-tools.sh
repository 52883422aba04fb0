#!/usr/bin/env bash
# scripts/bench-tools.sh: builds the baselines of the volume benchmark,
# restic and kopia, from their official Go modules (never a distribution
# package, whose version and build flags differ), and prints where they are.
#
# Each tool is built once with `go install` into
# ${FERRY_CACHE:-$HOME/.cache/ferry-testenv}/bench-tools/<tool>-<version>/bin
# and reused from there, so a second run is a no-op. The versions are pinned
# below: the newest v0.x release of each that the Go module proxy serves
# (`go list -m github.com/restic/restic@vX.Y.Z`; the proxy's version list is
# incomplete, so each candidate was checked by name). RESTIC_VERSION and
# KOPIA_VERSION override them. Where `go install TOOL@VERSION` fails because
# the proxy does not serve the module's version list (kopia), the same
# package is built in a throwaway module that has the tool's own go.mod.
#
#   scripts/bench-tools.sh              build both (or reuse), print TOOL=PATH lines
#   scripts/bench-tools.sh restic       just one of them
#   scripts/bench-tools.sh --print      print the paths without building
#
# Time on 2 cores: a few minutes per tool the first time (runs under nice).
set -euo pipefail

RESTIC_VERSION=${RESTIC_VERSION:-v0.19.1}
KOPIA_VERSION=${KOPIA_VERSION:-v0.23.1}
CACHE=${FERRY_CACHE:-$HOME/.cache/ferry-testenv}/bench-tools

log() { printf '[bench-tools] %s\n' "$*" >&2; }

# tool_dir TOOL: the cache directory of TOOL at its pinned version.
tool_dir() {
  case $1 in
    restic) echo "$CACHE/restic-$RESTIC_VERSION" ;;
    kopia) echo "$CACHE/kopia-$KOPIA_VERSION" ;;
    *) log "unknown tool: $1"; exit 2 ;;
  esac
}

# tool_module TOOL: TOOL's module and version; tool_main TOOL: its main package.
tool_module() {
  case $1 in
    restic) echo "github.com/restic/restic@$RESTIC_VERSION" ;;
    kopia) echo "github.com/kopia/kopia@$KOPIA_VERSION" ;;
  esac
}
tool_main() {
  case $1 in
    restic) echo "github.com/restic/restic/cmd/restic" ;;
    kopia) echo "github.com/kopia/kopia" ;;
  esac
}

# wrapper_build TOOL OUTDIR: `go build` of TOOL's main package inside a
# module whose go.mod is TOOL's own (same requirements, so the same
# dependency versions as `go install`), for when `go install MODULE@VERSION`
# cannot run: it also asks the proxy for the module's version list (the
# deprecation check), which the proxy does not serve for every module.
wrapper_build() {
  local tool=$1 out=$2 module version gomod work
  module=$(tool_module "$tool")
  version=${module#*@}
  module=${module%@*}
  gomod=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "$module@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
  work=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  sed -e "s#^module .*#module ferry.bench/$tool#" -e '/^toolchain /d' "$gomod" > "$work/go.mod"
  printf '\nrequire %s %s\n' "$module" "$version" >> "$work/go.mod"
  (cd "$work" && GOFLAGS=-mod=mod CGO_ENABLED=0 nice -n 10 go build -ldflags "-s -w" -o "$out/$tool" "$(tool_main "$tool")")
}

build_tool() {
  local tool=$1 dir bin
  dir=$(tool_dir "$tool")
  bin="$dir/bin/$tool"
  if [[ -x $bin ]]; then
    log "$tool: cached ($bin)"
    return
  fi
  command -v go >/dev/null 2>&1 || { log "Go is required to build $tool (https://go.dev/doc/install)"; exit 1; }
  local module
  module=$(tool_module "$tool")
  log "$tool: building $(tool_main "$tool")@${module#*@}"
  rm -rf "$dir/bin.tmp"
  mkdir -p "$dir/bin.tmp"
  # Into a temporary directory first, so an interrupted build is not taken
  # for a cached one.
  if ! GOFLAGS=-mod=mod CGO_ENABLED=0 GOBIN="$dir/bin.tmp" \
    nice -n 10 go install -ldflags "-s -w" "$(tool_main "$tool")@${module#*@}"; then
    log "$tool: go install failed; building in a module with $tool's own go.mod"
    wrapper_build "$tool" "$dir/bin.tmp"
  fi
  rm -rf "$dir/bin"
  mv "$dir/bin.tmp" "$dir/bin"
  log "$tool: built ($bin)"
}

print_only=false
tools=()
for arg in "$@"; do
  case $arg in
    --print) print_only=true ;;
    restic|kopia) tools+=("$arg") ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) log "unknown argument: $arg"; exit 2 ;;
  esac
done
((${#tools[@]})) || tools=(restic kopia)

for tool in "${tools[@]}"; do
  $print_only || build_tool "$tool"
  printf '%s=%s\n' "$tool" "$(tool_dir "$tool")/bin/$tool"
done
