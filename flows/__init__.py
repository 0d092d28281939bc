"""Prefect flows: composition only; every step lives in ``tasks/``.

Importing this package changes nothing: the process settings (telemetry off, the temporary
Prefect API's start-up timeout) are ``flows.runtime.configure_runtime``, which the CLI, the
tests and the flows call.
"""
