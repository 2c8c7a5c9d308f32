#!/usr/bin/env bash
# Set up (first run only) and start the agent. Arguments go to run_agent.py, e.g.
#   scripts/run_agent.sh --port 8080
#   scripts/run_agent.sh --engine glm4voice --model-dir /models/glm-4-voice
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python run_agent.py "$@"
