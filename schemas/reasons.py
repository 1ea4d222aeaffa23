"""Drop-reason names: part of the interface (reports, rejects files, users' queries)."""

# The seven reported stages in pipeline order; each reason is reported as "<stage>.<reason>".
STAGES: tuple[str, ...] = ("extract", "source", "fetch", "refine", "image", "align", "crossbatch")

REASONS: dict[str, tuple[str, ...]] = {
    "extract": ("no_src", "bad_url", "svg", "tracking_pixel", "duplicate"),
    "source": ("caption_not_chinese", "text_nsfw", "blacklisted_site", "word_count"),
    "fetch": (
        "http_error", "timeout", "too_large", "not_image", "decode_error", "opt_out", "robots",
        "blocked_address",
    ),
    "refine": ("lid", "stop_words", "no_noun", "unk_tokens", "low_entropy", "text_safety"),
    "image": ("geometry", "low_texture", "blur", "low_entropy", "embed_error", "duplicate", "nsfw"),
    "align": ("out_of_band",),
    "crossbatch": ("duplicate",),
}

SCHEMA_VIOLATION = "schema_violation"  # row-level contract failure; listed in a report only when it occurs


def full_reason(stage: str, reason: str) -> str:
    """`<stage>.<reason>`, checked against the table so a typo fails loudly."""
    if reason != SCHEMA_VIOLATION and reason not in REASONS[stage]:
        raise KeyError(f"unknown drop reason {stage}.{reason}")
    return f"{stage}.{reason}"


def stage_reasons(stage: str) -> list[str]:
    """All full reason names of one stage, in table order."""
    return [f"{stage}.{r}" for r in REASONS[stage]]
