"""Tests for tasks.sites: blacklist files as people publish them, host normalisation, subdomain matching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _fixtures import fixture_path

from tasks.sites import SiteBlacklist, normalise_domain, normalise_host


@pytest.mark.parametrize("value, host", [
    ("example.com", "example.com"),
    ("WWW.Example.COM", "www.example.com"),
    ("example.com.", "example.com"),
    ("example.com:8080", "example.com"),
    ("Example.COM.:443", "example.com"),
    ("https://user:pw@IMG.example.com:8443/a/b.jpg?x=1#y", "img.example.com"),
    ("//cdn.example.com/x.png", "cdn.example.com"),
    ("例子.测试", "xn--fsqu00a.xn--0zwm56d"),
    ("https://Bücher.example/katalog", "xn--bcher-kva.example"),
    ("ｅｘａｍｐｌｅ．ｃｏｍ", "example.com"),  # full-width letters and dot
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("  example.com  ", "example.com"),
    (None, ""),
    (float("nan"), ""),
])
def test_hosts_are_normalised(value, host):
    assert normalise_host(value) == host


@pytest.mark.parametrize("entry, domain", [
    ("www.example.com", "example.com"),
    ("WWW.EXAMPLE.COM", "example.com"),
    ("http://www.example.com/some/page.html", "example.com"),
    ("*.example.com", "example.com"),
    (".example.com", "example.com"),
    ("example.com:81", "example.com"),
    ("例子.测试", "xn--fsqu00a.xn--0zwm56d"),
    ("xn--fsqu00a.xn--0zwm56d", "xn--fsqu00a.xn--0zwm56d"),
])
def test_list_entries_are_reduced_to_the_domain(entry, domain):
    assert normalise_domain(entry) == domain


def test_a_domain_covers_its_subdomains_and_nothing_else():
    sites = SiteBlacklist(["bad.example", "www.other.test", "例子.测试"])
    assert sites.domains == {"bad.example", "other.test", "xn--fsqu00a.xn--0zwm56d"}
    for listed in ["bad.example", "BAD.example.", "img.cdn.bad.example:8080", "https://www.bad.example/x",
                   "other.test", "m.other.test", "图片.例子.测试", "xn--fsqu00a.xn--0zwm56d"]:
        assert sites.listed(listed), listed
    for clean in ["notbad.example", "bad.example.org", "example", "bad-example", "other.test.evil", "", None,
                  "https://good.example/bad.example", "good.example/?u=bad.example"]:
        assert not sites.listed(clean), clean


def test_mask_is_vectorised_over_hosts_and_urls():
    sites = SiteBlacklist(["bad.example"])
    values = pd.Series(["img.bad.example", None, "good.example", "img.bad.example", np.nan, "BAD.EXAMPLE.:80", ""],
                       index=list("abcdefg"), dtype=object)
    mask = sites.mask(values)
    assert mask.dtype == bool and mask.index.tolist() == list("abcdefg")
    assert mask.tolist() == [True, False, False, True, False, True, False]
    assert sites.mask(pd.Series([], dtype="str")).empty
    assert not SiteBlacklist([]).mask(values).any()


def test_builtin_default_list_loads():
    sites = SiteBlacklist.load(["sites"])
    assert 3 <= len(sites) <= 50
    assert all("." in d and d == d.lower() for d in sites.domains)


def test_missing_empty_and_blank_lists_are_errors_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        SiteBlacklist.load([tmp_path / "gone.txt"])
    for name, content in [("empty.txt", b""), ("blank.txt", b"\r\n \n\t\n")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*holds no entries"):
            SiteBlacklist.load(["sites", tmp_path / name])


def test_a_published_list_crlf_urls_ports_and_case():
    """fwwdn's 网址.txt as published (read in place): CRLF, www., upper case, URLs, paths and ports."""
    path = fixture_path("lexicons/fwwdn/网址.txt")
    raw = path.read_bytes()
    assert b"\r\n" in raw and b"WWW.CUIQING.NET.CN" in raw and b"http://www.game163.in" in raw
    sites = SiteBlacklist.load([path])
    assert len(sites) > 8000
    assert all(d == d.lower() and d == d.strip() and not d.startswith("www.") and "/" not in d for d in sites.domains)
    assert "cuiqing.net.cn" in sites.domains and "game163.in" in sites.domains
    assert sites.listed("http://BBS.CuiQing.net.cn:8080/thread") and sites.listed("goal98.netsh.com")
    assert not sites.listed("netsh.com")  # a listed subdomain does not cover its parent


def test_fingerprint_follows_the_domains(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("www.bad.example\n", encoding="utf-8")
    b.write_text("bad.example,\r\n# comment\r\n", encoding="utf-8")
    assert SiteBlacklist.load([a]).fingerprint == SiteBlacklist.load([b]).fingerprint
    b.write_text("bad.example\nworse.example\n", encoding="utf-8")
    assert SiteBlacklist.load([a]).fingerprint != SiteBlacklist.load([b]).fingerprint
