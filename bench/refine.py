"""Benchmark: stage refine (tasks/refine.py), the whole text chain, against one bare jieba.posseg pass.

The noun rule needs part-of-speech tags, so one jieba.posseg pass over the captions is the irreducible cost of
stage 2; ratio_vs_posseg = time(posseg pass) / time(refine_text), the fastest of `--repeat` alternating rounds
in this same run (the machine is shared and noisy; captions/s are printed for context). 1.0 would mean the
rest of the chain (cleaning, fastText LID, OpenCC, the [UNK] count, the keyword automaton, the stop-word and
entropy rules, the frame building) costs nothing beyond tagging.

Both sides load their dictionaries and models before timing, tag with the same HMM setting, and see each
caption once per round: nothing is cached across rounds (the chain's only memo is a per-character table).
One process, one thread: the figures are per core. The [UNK] rule counts with the placeholder tokenizer (no
tokenizer can be loaded offline); a real tokenizer's cost is the model's, not the chain's.

Captions: the 4,712 human-written COCO-CN captions (../shared/fixtures/images/coco_cn/coco-cn_ext.icap2020.txt),
or, when that file is absent, as many generated from jieba's dictionary words (seeded). Last stdout line: one
JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import best_of  # noqa: E402 - after the checkout is on sys.path

CAPTIONS = ROOT.parent / "shared/fixtures/images/coco_cn/coco-cn_ext.icap2020.txt"
N_GENERATED = 4712


def load_captions(path: Path = CAPTIONS) -> tuple[list[str], str]:
    """COCO-CN's captions ("<image id>#<n>\\t<caption>" lines), else generated ones; and which it was."""
    if path.is_file():
        with path.open(encoding="utf-8") as lines:
            return [line.rstrip("\n").split("\t", 1)[-1] for line in lines if line.strip()], "coco-cn"
    from tasks.refine import jieba_corpus

    freq = jieba_corpus().freq
    words = [w for w, f in freq.items() if f >= 50 and len(w) <= 4]
    weights = [freq[w] for w in words]
    rng = random.Random(0)
    return ["".join(rng.choices(words, weights, k=rng.randint(5, 12))) for _ in range(N_GENERATED)], "generated"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, help="alternating rounds; the fastest of each is compared (default 7)")
    ap.add_argument("--quick", action="store_true", help="3 rounds: well under a minute")
    ap.add_argument("--limit", type=int, help="use only the first N captions")
    ap.add_argument("--no-hmm", action="store_true", help="tag without jieba's HMM, on both sides")
    args = ap.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 7)

    import pandas as pd

    from tasks.refine import RefineConfig, _jieba, load_resources, refine_text

    captions, source = load_captions()
    captions = captions[: args.limit] if args.limit else captions
    config = RefineConfig(hmm=not args.no_hmm)
    resources = load_resources(config)  # keyword automaton, stop words, jieba's corpus
    frame = pd.DataFrame({"key": [f"{i:020x}" for i in range(len(captions))],
                          "alt_norm": pd.Series(captions, dtype="str")})
    cut = _jieba().posseg.dt.cut
    hmm = config.hmm
    refine_text(frame.head(50), config, resources)  # loads fastText, OpenCC and posseg's tables

    def posseg():  # every (word, tag) pair produced and dropped: the least a tagging pass can cost
        for c in captions:
            deque(cut(c, HMM=hmm), maxlen=0)

    def chain():
        return refine_text(frame, config, resources)

    times, results = best_of({"posseg": posseg, "refine": chain}, repeat)
    out = results["refine"]
    n = len(captions)
    figures = {
        "captions": n,
        "source": source,
        "rounds": repeat,
        "hmm": hmm,
        "tokenizer": "placeholder",
        "captions_per_s": round(n / times["refine"], 1),
        "posseg_captions_per_s": round(n / times["posseg"], 1),
        "ratio_vs_posseg": round(times["posseg"] / times["refine"], 3),
        "kept_share": round(float(out["drop_reason"].isna().mean()), 4),
        "dropped": {k: int(v) for k, v in out["drop_reason"].value_counts().sort_index().items()},
    }
    print(f"refine {figures['captions_per_s']:.0f} captions/s, posseg alone {figures['posseg_captions_per_s']:.0f} "
          f"captions/s ({source}, {n} captions, best of {repeat})", file=sys.stderr)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
