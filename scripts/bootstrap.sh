#!/usr/bin/env bash
# Shared by demo.sh and test.sh: the Debian packages the project needs, and a virtualenv in .venv
# with kgpu installed (editable). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in "$@"; do            # arguments: command:package, e.g. promtool:prometheus
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The mosquitto package starts a system broker on :1883; the tests and the demo run their own.
  if [[ " ${need_apt[*]} " == *" mosquitto "* ]] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
  # Likewise rabbitmq-server: the broker tests run their own, on free ports, with its own epmd.
  if [[ " ${need_apt[*]} " == *" rabbitmq-server "* ]] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
extras=${KGPU_EXTRAS:-}
stamp=.venv/.kgpu-installed${extras:+-$extras}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing kgpu${extras:+[$extras]} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}" 2>&1 | grep -v "^WARNING: Location" || true
  check="import edge, cloud, shared, kgpu"
  case ",$extras," in  # the demo and the tests need the lab's libraries (and with them both sides')
    *,lab,*|*,demo,*|*,test,*) check="$check, kgpu.lab.kube, pynvml, alembic, psycopg" ;;
  esac
  .venv/bin/python -c "$check" || { echo "install failed" >&2; exit 1; }
  touch "$stamp"
fi
