"""flows/tls.py: every Prefect API client of a process shares one TLS context per setting."""

from __future__ import annotations

import ssl

from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

from flows import tls


def _verify(client) -> ssl.SSLContext:
    return client._client._transport._pool._ssl_context


def test_clients_share_one_verified_context_and_a_setting_change_gets_its_own():
    tls.install()
    tls.install()  # idempotent: not wrapped twice
    assert getattr(SyncPrefectClient.__init__, "shares_tls_context", False)
    a, b = SyncPrefectClient("http://127.0.0.1:1/api"), PrefectClient("http://127.0.0.1:1/api")
    assert _verify(a) is _verify(b)
    assert _verify(a).verify_mode == ssl.CERT_REQUIRED and _verify(a).check_hostname
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        c = SyncPrefectClient("http://127.0.0.1:1/api")
    assert _verify(c) is not _verify(a) and _verify(c).verify_mode == ssl.CERT_NONE
    own = ssl.create_default_context()
    d = SyncPrefectClient("http://127.0.0.1:1/api", httpx_settings={"verify": own})
    assert _verify(d) is own  # a caller's own context is kept
