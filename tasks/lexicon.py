"""Keyword lists (one entry a line) and the Aho-Corasick matcher that the text-safety rules share."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import ahocorasick
import numpy as np
import pandas as pd

BUILTIN_LISTS = ("adult", "ads", "political", "territorial")  # tasks/data/lexicons/<name>.txt
_TRAILING = ",，、;；"  # some published lists end every entry with one of these
_SPACE = re.compile(r"\s+")
_ASCII_WORD = re.compile(r"[0-9a-z ]+")  # such keywords match whole words only: "sm" is not in "sms"
_SEPARATOR = "\n"  # joins texts for one automaton pass; no keyword holds it (entries are lines)


class Hit(NamedTuple):
    list_name: str
    keyword: str


def normalise_text(text: str) -> str:
    """How keywords and texts are compared: NFKC (full-width Latin becomes ASCII), lower case, single spaces."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def read_list(source: str | Path, builtin_dir: str = "lexicons", builtins: tuple[str, ...] = BUILTIN_LISTS,
              what: str = "keyword list") -> tuple[str, list[str]]:
    """(name, entries) of a built-in list name or a UTF-8 file, one entry a line.

    A BOM, CR line ends, surrounding whitespace and trailing commas are dropped; blank lines and lines
    starting with ``#`` are skipped. A missing file or one without entries is an error naming the path.
    """
    if isinstance(source, str) and source in builtins:
        name, where = source, resources.files("tasks").joinpath("data", builtin_dir, f"{source}.txt")
    else:
        where = Path(source).expanduser()
        name = where.stem
        if not where.is_file():
            raise FileNotFoundError(
                f"{what} {str(source)!r} not found: no such file ({where.resolve()}) and not a built-in list "
                f"({', '.join(builtins)})"
            )
    try:
        text = where.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {where} is not UTF-8 text: {error}") from error
    entries = []
    for line in text.splitlines():
        entry = line.strip().rstrip(_TRAILING).strip()
        if entry and not entry.startswith("#"):
            entries.append(entry)
    if not entries:
        raise ValueError(f"{what} {where} holds no entries (only blank or # comment lines)")
    return name, entries


def _fingerprint(lists: dict[str, tuple]) -> str:
    """Of the normalised contents, so editing a list file changes it and moving one does not."""
    return hashlib.sha256(json.dumps(sorted(lists.items()), ensure_ascii=False).encode()).hexdigest()[:16]


class Lexicon:
    """Named keyword lists and one automaton over all of them.

    A keyword matches as a substring of the normalised text, except that one made only of ASCII letters,
    digits and spaces must stand as a whole word. The first hit is the one that ends first in the text;
    of several ending there, the longest. A keyword in several lists reports the first list.
    """

    def __init__(self, lists: dict[str, Iterable[str]]) -> None:
        self.lists: dict[str, tuple[str, ...]] = {}
        self._automaton = ahocorasick.Automaton()
        for name, keywords in lists.items():
            normalised = tuple(dict.fromkeys(k for k in map(normalise_text, keywords) if k))
            self.lists[name] = normalised
            for keyword in normalised:
                if keyword not in self._automaton:
                    self._automaton.add_word(keyword, (name, keyword, bool(_ASCII_WORD.fullmatch(keyword))))
        if len(self._automaton):
            self._automaton.make_automaton()
        self.fingerprint = _fingerprint(self.lists)

    @classmethod
    def load(cls, sources: Iterable[str | Path]) -> Lexicon:
        """Built-in list names (``BUILTIN_LISTS``) or paths to files; a file's list name is its stem."""
        lists: dict[str, list[str]] = {}
        for source in sources:
            name, entries = read_list(source)
            lists.setdefault(name, []).extend(entries)
        return cls(lists)

    def __len__(self) -> int:
        return len(self._automaton)

    def find(self, text: str | None) -> Hit | None:
        """The first hit in ``text``, or None (also for None, NaN and other non-strings)."""
        if not len(self) or not isinstance(text, str):
            return None
        return next((hit for _, hit in self._scan(normalise_text(text))), None)

    def hits(self, texts: pd.Series) -> pd.DataFrame:
        """``find`` for every text at once: columns ``list_name`` and ``keyword``, missing where nothing hit."""
        names = np.full(len(texts), None, dtype=object)
        keywords = np.full(len(texts), None, dtype=object)
        if len(self) and len(texts):
            normalised = [normalise_text(t) if isinstance(t, str) else "" for t in texts.tolist()]
            # One automaton pass over all texts joined: the per-call overhead is paid once, not per row.
            starts = np.cumsum([0] + [len(t) + 1 for t in normalised[:-1]])
            for end, hit in self._scan(_SEPARATOR.join(normalised)):
                row = int(np.searchsorted(starts, end, side="right")) - 1
                if names[row] is None:
                    names[row], keywords[row] = hit
        return pd.DataFrame({"list_name": pd.Series(names, index=texts.index, dtype="str"),
                             "keyword": pd.Series(keywords, index=texts.index, dtype="str")})

    def _scan(self, haystack: str):
        for end, (name, keyword, whole_word) in self._automaton.iter(haystack):
            start = end - len(keyword) + 1
            if whole_word and (_word_char(haystack, start - 1) or _word_char(haystack, end + 1)):
                continue
            yield end, Hit(name, keyword)


def _word_char(text: str, i: int) -> bool:
    return 0 <= i < len(text) and text[i].isascii() and text[i].isalnum()
