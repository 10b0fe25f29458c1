#!/usr/bin/env bash
# Set up the project on a fresh machine and run it or its tests.
#   scripts/dev.sh setup   uv (if missing) + the locked virtual environment (+ the Claude CLI)
#   scripts/dev.sh up      setup (the Claude CLI too: ANTHROPIC_API_KEY=… make up runs real
#                          agents), then `podium up`
#   scripts/dev.sh test    setup, then ruff, mypy --strict and the whole pytest suite
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION="0.13.9"
export UV_PYTHON_DOWNLOADS=never  # use the machine's Python (>= 3.11); no downloads

uv_bin() {
  if command -v uv >/dev/null 2>&1; then
    command -v uv
    return
  fi
  if [ ! -x .tools/uv/bin/uv ]; then
    echo "installing uv ${UV_VERSION} into .tools/uv" >&2
    python3 -m venv .tools/uv
    .tools/uv/bin/pip install --quiet --disable-pip-version-check "uv==${UV_VERSION}"
  fi
  echo "$PWD/.tools/uv/bin/uv"
}

setup() {
  UV="$(uv_bin)"
  "$UV" sync --frozen --all-packages
}

setup_claude() {
  # The real Claude Code CLI, pinned in tools/claude, for the agent tests.
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm not found: no Claude Code CLI (its tests are skipped; agents run offline)" >&2
    return
  fi
  if [ ! -x tools/claude/node_modules/.bin/claude ]; then
    echo "installing the pinned Claude Code CLI into tools/claude" >&2
    (cd tools/claude && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

setup_promtool() {
  # Debian's promtool, for the tests that check the alert rules and /metrics. Only the
  # package's files are unpacked into .tools (nothing is installed on the machine).
  if [ -x .tools/prometheus/usr/bin/promtool ] || ! command -v apt-get >/dev/null 2>&1; then
    return
  fi
  echo "fetching Debian's prometheus package for promtool into .tools/prometheus" >&2
  rm -rf .tools/prometheus-deb && mkdir -p .tools/prometheus-deb
  if (cd .tools/prometheus-deb && apt-get download -q prometheus >/dev/null 2>&1) \
     && dpkg-deb -x .tools/prometheus-deb/prometheus_*.deb .tools/prometheus; then
    rm -rf .tools/prometheus-deb
  else
    echo "could not fetch promtool: the tests that need it will be skipped" >&2
  fi
}

setup_sandbox() {
  # Debian's bubblewrap and socat, for the workers' agent sandbox (podium.agents.sandbox),
  # when the machine has none: only the packages' files are unpacked into .tools.
  local package program
  for package in bubblewrap:bwrap socat:socat; do
    program=${package#*:}
    package=${package%%:*}
    if command -v "$program" >/dev/null 2>&1 || [ -x ".tools/$package/usr/bin/$program" ] \
       || ! command -v apt-get >/dev/null 2>&1; then
      continue
    fi
    echo "fetching Debian's $package package into .tools/$package" >&2
    rm -rf ".tools/$package-deb" && mkdir -p ".tools/$package-deb"
    if (cd ".tools/$package-deb" && apt-get download -q "$package" >/dev/null 2>&1) \
       && dpkg-deb -x ".tools/$package-deb/${package}_"*.deb ".tools/$package"; then
      rm -rf ".tools/$package-deb"
    else
      echo "could not fetch $package: workers' agents will run without a sandbox" >&2
    fi
  done
}

setup_browser() {
  # Debian's Chromium, for the console's browser tests (Playwright drives it with
  # executable_path; `playwright install` cannot download browsers here). It needs its
  # shared libraries, so it is installed with apt, which needs root.
  if [ -x /usr/bin/chromium ]; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "no /usr/bin/chromium (install Debian's chromium as root): the browser tests" \
         "will be skipped" >&2
    return
  fi
  echo "installing Debian's chromium (for the console's browser tests)" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       chromium >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium >/dev/null 2>&1 \
      || echo "could not install chromium: the browser tests will be skipped" >&2
  fi
}

case "${1:-}" in
  setup)
    setup
    setup_claude
    setup_promtool
    setup_sandbox
    setup_browser
    ;;
  up)
    setup
    setup_claude
    setup_sandbox
    shift
    exec .venv/bin/podium up "$@"
    ;;
  test)
    setup
    setup_claude
    setup_promtool
    setup_sandbox
    setup_browser
    shift
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    exec .venv/bin/pytest "$@"
    ;;
  *)
    echo "usage: $0 setup|up|test" >&2
    exit 2
    ;;
esac
