"""The host's own default plugin: /health, /openapi.json, /v1/models, /v1/capabilities."""
