#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with everything the agent needs.
#   scripts/setup.sh          # the agent
#   scripts/setup.sh --test   # the agent + what the tests need (system packages when root)
# Environment knobs:
#   PYTHON=python3.12          interpreter to build the venv from (>= 3.11)
#   TORCH_SPEC="torch==2.13.0" the torch requirement
#   TORCH_INDEX_URL=URL        where to get torch from, e.g. https://download.pytorch.org/whl/cpu
#                              (CPU-only, small) or https://download.pytorch.org/whl/cu128 (CUDA 12.8)
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

log() { echo "[setup] $*" >&2; }

find_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  for candidate in python3.12 python3.11 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  log "Python >= 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1
}

install_system_packages() {
  # Test-only tools: eSpeak NG + SoX make test speech, Chromium runs the browser tests,
  # libspeexdsp1 backs the speex echo canceller.
  local pkgs=(espeak-ng sox chromium libspeexdsp1)
  local missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return
  if ! command -v apt-get >/dev/null 2>&1; then
    log "not a Debian/Ubuntu system: install ${missing[*]} yourself (tests that need them skip)"; return
  fi
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      log "not root: run 'sudo apt-get install ${missing[*]}' (tests that need them skip)"; return
    fi
  fi
  log "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

py=$(find_python)
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $py"
  "$py" -m venv .venv
fi

extras="int4"
[[ $want_tests -eq 1 ]] && extras="int4,test"
# a digest of what decides the install (macOS has shasum, not sha1sum)
digest=$(cat pyproject.toml scripts/setup.sh | "$py" -c 'import hashlib, sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:12])')
stamp=".venv/.installed-$digest-$extras"
if [[ ! -f "$stamp" ]]; then
  torch_spec="${TORCH_SPEC:-torch==2.13.0}"
  torch_args=()
  [[ -n "${TORCH_INDEX_URL:-}" ]] && torch_args=(--index-url "$TORCH_INDEX_URL")
  log "installing $torch_spec"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$torch_spec" "${torch_args[@]}"
  log "installing the project ($extras)"
  # The torch already installed satisfies the project's range, so nothing replaces it.
  .venv/bin/python -m pip install -q -e ".[$extras]"
  rm -f .venv/.installed-*
  touch "$stamp"
else
  log "python packages up to date"
fi

[[ $want_tests -eq 1 ]] && install_system_packages
log "ready"
