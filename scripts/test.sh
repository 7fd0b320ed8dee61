#!/usr/bin/env bash
# The test suite: sets itself up, then runs ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check gptq_fsdp tests scripts benchmarks examples
.venv/bin/python -m pytest -q "$@"
