"""Stage crossbatch (stage 4): the redundancy rule again, across runs: a run's survivors against the committed
output of every run committed before it in the same output root. Earlier committed rows always win."""

from __future__ import annotations

import pandas as pd

STAGE = "crossbatch"
RULES = ("duplicate",)


def mark_crossbatch(frame: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """Rows with a committed earlier row within the radius (`matches`: key, match_key, match_run,
    match_distance) are `crossbatch.duplicate`; the match is kept beside them so a reject says what it repeats."""
    out = frame.copy()
    m = matches.drop_duplicates("key").set_index("key")
    for col in ("match_key", "match_run"):
        out[f"crossbatch_{col}"] = out["key"].map(m[col]).astype("str")
    out["crossbatch_distance"] = out["key"].map(m["match_distance"]).astype("float64")
    reason = pd.Series(pd.NA, index=out.index, dtype="str")
    reason[out["key"].isin(m.index).to_numpy()] = f"{STAGE}.duplicate"
    out["drop_reason"] = reason
    return out


def match_frame(keys: list[str], found) -> pd.DataFrame:
    """The search's matches as a frame: key, match_key, match_run, match_distance."""
    qi, match_key, match_run, dist = found
    key_arr = pd.Series(keys, dtype="str").to_numpy()
    return pd.DataFrame({"key": pd.Series(key_arr[qi], dtype="str"),
                         "match_key": pd.Series(list(match_key), dtype="str"),
                         "match_run": pd.Series(list(match_run), dtype="str"),
                         "match_distance": pd.Series(dist, dtype="float64")})
