#!/usr/bin/env bash
# One entry point for a fresh machine with only Python 3.11:
#   bash tools/dev.sh demo   # set up what is missing, train + evaluate the CPU demo, draw predictions
#   bash tools/dev.sh test   # set up what is missing, run the test suite
#   bash tools/dev.sh setup  # only set up
# The environment is a virtualenv at $DINODET2_VENV (default: ./.venv), created once and reused.
# If the base Python can already import detectron2 (e.g. built from GitHub), the venv sees it
# (--system-site-packages) and it is used; otherwise the PyPI build sal-detectron2==0.7.2 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${DINODET2_VENV:-$ROOT/.venv}
BASE_PY=${PYTHON:-python3}
PY="$VENV/bin/python"
TORCH_SPEC=${DINODET2_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
# Re-run the install steps only when these files change.
STAMP="$VENV/.dinodet2-setup-$(cat setup.py tools/dev.sh | sha1sum | cut -c1-12)"

log() { echo "[dinodet2 setup] $*"; }

setup_env() {
  if [ -f "$STAMP" ]; then
    log "environment $VENV is up to date"
  else
    if [ ! -x "$PY" ]; then
      if "$BASE_PY" -c "import detectron2" >/dev/null 2>&1; then
        log "base Python already has detectron2; creating $VENV with --system-site-packages"
        "$BASE_PY" -m venv --system-site-packages "$VENV"
      else
        log "creating virtualenv $VENV"
        "$BASE_PY" -m venv "$VENV"
      fi
    fi
    "$PY" -m pip install -q --upgrade pip
    if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
      log "installing $TORCH_SPEC"
      "$PY" -m pip install -q $TORCH_SPEC
    fi
    if ! "$PY" -c "import detectron2.engine" >/dev/null 2>&1; then
      log "detectron2 not importable: installing the PyPI build sal-detectron2==0.7.2 (its detectron2/ package only)"
      tmp=$(mktemp -d)
      "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
        --target "$tmp" sal-detectron2==0.7.2
      site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      rm -rf "$site/detectron2"
      cp -r "$tmp/detectron2" "$site/detectron2"
      rm -rf "$tmp"
    fi
    log "installing dinodet2 and its dependencies"
    "$PY" -m pip install -q -e "$ROOT[test]"
    rm -f "$VENV"/.dinodet2-setup-*
    touch "$STAMP"
  fi
  "$PY" - <<'PYEOF'
import os, detectron2, torch, transformers, peft
print(f"[dinodet2 setup] detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}")
print(f"[dinodet2 setup] torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PYEOF
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup_env ;;
  test)
    setup_env
    exec "$PY" -m pytest tests "$@" ;;
  demo)
    setup_env
    OUT=${DINODET2_DEMO_OUTPUT:-$ROOT/output/demo}
    CFG=${DINODET2_DEMO_CONFIG:-configs/Demo/detr_shapes_tiny_improved.yaml}
    "$PY" tools/train_net.py --config-file "$CFG" OUTPUT_DIR "$OUT" "$@"
    "$PY" tools/visualize_predictions.py --config-file "$CFG" --output "$OUT/predictions" --score-threshold 0.3 \
      MODEL.WEIGHTS "$OUT/model_final.pth" "$@"
    log "demo done: metrics in $OUT/log.txt, pictures in $OUT/predictions/" ;;
  *)
    echo "usage: bash tools/dev.sh {demo|test|setup} [extra args]" >&2
    exit 2 ;;
esac
