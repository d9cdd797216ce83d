"""A plugin that fails to import: the host must start anyway and report it."""

raise RuntimeError("kiapi-broken fails to import on purpose")
