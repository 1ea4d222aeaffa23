"""DanQing's Table 6 (arXiv 2601.10305): pairs left after each rule, the figures every comparison is made against."""

from __future__ import annotations

from schemas.reasons import stage_reasons

SOURCE = "DanQing (arXiv 2601.10305) Table 6"

# (paper step, our reasons, pairs left after it). Rules the paper merged share one row.
PAPER_AFTER: list[tuple[str, tuple[str, ...] | None, int]] = [
    ("raw pairs", None, 1_047_085_609),
    ("language + safety", ("source.caption_not_chinese", "source.text_nsfw"), 726_334_674),
    ("source + length", ("source.blacklisted_site", "source.word_count"), 706_069_936),
    ("download", tuple(stage_reasons("fetch")), 475_104_485),
    ("Chinese LID", ("refine.lid",), 467_455_303),
    ("stop words", ("refine.stop_words",), 442_680_171),
    ("nouns", ("refine.no_noun",), 431_878_774),
    ("[UNK]", ("refine.unk_tokens",), 431_619_647),
    ("entropy", ("refine.low_entropy",), 400_068_251),
    ("text safety", ("refine.text_safety",), 397_187_759),
    ("geometry", ("image.geometry",), 352_663_012),
    ("low texture", ("image.low_texture",), 352_204_550),
    ("blur", ("image.blur",), 333_255_945),
    ("image entropy", ("image.low_entropy",), 316_359_868),
    ("redundancy", ("image.duplicate",), 186_019_602),
    ("image safety", ("image.nsfw",), 178_601_215),
    ("alignment band", ("align.out_of_band",), 154_293_590),
    ("cross-batch dedup", ("crossbatch.duplicate",), 99_892_381),
]
PAPER_STAGE_AFTER = {"extract": 1_047_085_609, "source": 706_069_936, "fetch": 475_104_485,
                     "refine": 397_187_759, "image": 178_601_215, "align": 154_293_590, "crossbatch": 99_892_381}


def paper_removal(reason: str) -> float:
    """The share of its step's input that the paper's step holding ``reason`` removed."""
    before = None
    for _, reasons, after in PAPER_AFTER:
        if reasons is not None and reason in reasons:
            return (before - after) / before
        before = after
    raise KeyError(f"{reason} has no row in {SOURCE}")


def stages_table(stages: list[dict]) -> list[str]:
    """A report's stages beside the paper's counts, as markdown table lines: in, kept, and kept as a share of the
    raw pairs (the extract stage's kept), each beside the paper's count after the stage and its share."""
    raw = stages[0]["kept"] or 1
    lines = ["| stage | in | kept | kept % of raw pairs | paper after | paper % of raw |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        paper = PAPER_STAGE_AFTER[s["stage"]]
        lines.append(f"| {s['stage']} | {s['in']} | {s['kept']} | {100 * s['kept'] / raw:.1f} | {paper:,} | "
                     f"{100 * paper / PAPER_STAGE_AFTER['extract']:.1f} |")
    return lines


def rules_table(stages: list[dict]) -> list[str]:
    """A report's per-rule removals beside the paper's, as markdown table lines: one row per paper step, our
    removed count and share of the step's input (rules that did not run say so)."""
    lines = ["| paper step | our reasons | our removed | our removed % of step input | paper removed % |",
             "|---|---|---:|---:|---:|"]
    drops = {r: n for s in stages for r, n in s["dropped"].items()}
    not_run = {r for s in stages for r in s["not_run"]}
    ours_in = stages[0]["kept"]
    paper_prev = None
    for name, reasons, after in PAPER_AFTER:
        if reasons is None:
            paper_prev = after
            continue
        removed = sum(drops.get(r, 0) for r in reasons)
        ran = [r for r in reasons if r not in not_run]
        ours = f"{100 * removed / ours_in:.1f}" if ran and ours_in else "not run"
        lines.append(f"| {name} | {', '.join(f'`{r}`' for r in reasons)} | {removed if ran else '-'} | {ours} | "
                     f"{100 * (paper_prev - after) / paper_prev:.1f} |")
        ours_in -= removed
        paper_prev = after
    return lines
