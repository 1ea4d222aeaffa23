"""Site blacklists: domain lists, host normalisation, and matching a host together with its parent domains."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from tasks.lexicon import read_list

BUILTIN_SITE_LISTS = ("sites",)  # tasks/data/blacklist/<name>.txt


def normalise_host(value: str | None) -> str:
    """The bare host of a host or URL: lower case, no scheme, user, port, path or trailing dot; IDN as ASCII.

    ``"HTTPS://user@Bücher.Example.:8080/x"`` -> ``"xn--bcher-kva.example"``; anything else -> ``""``.
    """
    if not isinstance(value, str):
        return ""
    host = unicodedata.normalize("NFKC", value).strip().lower()
    host = host.split("://", 1)[-1].lstrip("/")  # also a protocol-relative //host/path
    for stop in "/?#":
        host = host.split(stop, 1)[0]
    host = host.rsplit("@", 1)[-1]
    if host.startswith("["):  # an IPv6 literal, kept without its brackets
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.strip(".")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:  # not a valid IDN (an empty label, a label over 63 characters): compare as written
        return host


def normalise_domain(entry: str) -> str:
    """A blacklist line as the domain it blocks: a host or URL, with ``*.`` and ``www.`` taken off."""
    domain = normalise_host(entry.removeprefix("*."))
    return domain.removeprefix("www.")


def host_values(frame: pd.DataFrame, host_column: str, url_column: str) -> pd.Series:
    """The host column, else the URL column (the matchers reduce a URL to its host); else no hosts."""
    for column in (host_column, url_column):
        if column in frame.columns:
            return frame[column]
    return pd.Series("", index=frame.index, dtype="str")


class SiteBlacklist:
    """Listed domains; a host is listed when it or one of its parent domains is. `strip_www=False` keeps a listed
    `www.` (a takedown list names exactly the domain it means)."""

    def __init__(self, domains: Iterable[str], strip_www: bool = True) -> None:
        clean = normalise_domain if strip_www else (lambda d: normalise_host(d.removeprefix("*.")))
        self.domains = frozenset(d for d in map(clean, domains) if d)
        self.fingerprint = hashlib.sha256("\n".join(sorted(self.domains)).encode()).hexdigest()[:16]

    @classmethod
    def load(cls, sources: Iterable[str | Path]) -> SiteBlacklist:
        """Built-in list names (``BUILTIN_SITE_LISTS``) or paths to files of domains, one a line."""
        domains: list[str] = []
        for source in sources:
            domains += read_list(source, "blacklist", BUILTIN_SITE_LISTS, "site list")[1]
        return cls(domains)

    def __len__(self) -> int:
        return len(self.domains)

    def listed(self, host_or_url: str | None) -> bool:
        labels = normalise_host(host_or_url).split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels))) if self.domains else False

    def mask(self, values: pd.Series) -> pd.Series:
        """``listed`` for every host or URL; each distinct value is checked once (a page's images share it)."""
        if not self.domains or values.empty:
            return pd.Series(False, index=values.index, dtype=bool)
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        listed = pd.Series([self.listed(v) for v in uniques] + [False], dtype=bool).to_numpy()
        return pd.Series(listed[codes], index=values.index, dtype=bool)
