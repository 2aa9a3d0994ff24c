#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine with Go: the module cache (which
# also holds the Llama 3 vocabulary the model synthesizer uses) and Chromium for the dashboard
# test, and the npm clients for the API test. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
go mod download
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || echo "chromium not installed: the dashboard test will skip"
fi
# The official OpenAI, Ollama and Anthropic npm clients for api's client test (pinned by
# api/testdata/clients/package-lock.json); without node the test skips.
if command -v npm >/dev/null 2>&1; then
	(cd api/testdata/clients && npm ci --no-audit --no-fund --loglevel=error) || echo "npm ci failed: the Node client test will skip"
else
	echo "npm not found: the Node client test will skip"
fi
