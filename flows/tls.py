"""One TLS context per process for Prefect's API clients.

Prefect builds a new SSL context (loading certifi's CA bundle: tens of milliseconds of CPU) for every API client it
creates, whatever the API's scheme, and its task engine creates clients per task run. On small shards that was
about a fifth of a Dask worker's CPU (py-spy on bench/scale.py's run). The context depends only on two settings,
so it is built once per their values and handed to Prefect through the client's own `httpx_settings["verify"]`,
which Prefect takes as given (its own code path for a caller-supplied context). Prefect's open pull request #19106
asks for the same reuse upstream; once a release reuses contexts itself, this module can go.
"""

from __future__ import annotations

import functools
import ssl


@functools.lru_cache(maxsize=4)
def _context(insecure: bool, cafile: str) -> ssl.SSLContext:
    """What Prefect's client builds: verified against `cafile`, or with PREFECT_API_TLS_INSECURE_SKIP_VERIFY none."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=cafile)


def shared_context() -> ssl.SSLContext:
    """The process's context for the current settings (a changed setting gets its own)."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    return _context(bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
                    PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


def install() -> None:
    """Give every Prefect API client made in this process the shared context (idempotent)."""
    from prefect.client import orchestration

    for cls in (orchestration.PrefectClient, orchestration.SyncPrefectClient):
        original = cls.__init__
        if getattr(original, "shares_tls_context", False):
            continue

        @functools.wraps(original)
        def init(self, api, *args, httpx_settings=None, _original=original, **kwargs):
            settings = dict(httpx_settings or {})
            if not isinstance(settings.get("verify"), ssl.SSLContext):  # as Prefect decides, from the settings
                settings["verify"] = shared_context()
            _original(self, api, *args, httpx_settings=settings, **kwargs)

        init.shares_tls_context = True
        cls.__init__ = init
