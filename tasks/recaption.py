"""Recaption step (after the commit, optional): one short generated caption per committed row, by batches.

A row whose caption cannot be generated stays in the dataset: its recaption is "" and `recaption_error` says why
(`decode_error: ...`, `out_of_memory: ...`, `generate_error: ...`, `empty`). It is never a drop.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from tasks.models.caption import is_out_of_memory
from tasks.models.embedding import to_rgb

COLUMNS = ("key", "recaption", "recaption_error")
EMPTY = "empty"  # the model generated nothing (or only special tokens), twice
ERROR_CHARS = 300  # an error message is cut here: it names the failure, it does not hold a traceback
# "请用一句话客观描述这张图片。" asks for one short factual sentence describing the image.
DEFAULT_PROMPT = "请用一句话客观描述这张图片。"


@dataclass(frozen=True)
class RecaptionConfig:
    prompt: str = DEFAULT_PROMPT  # the instruction given with every image (Chinese: one short factual sentence)
    max_new_tokens: int = 64  # generated tokens per caption at most
    batch_size: int = 16  # images per generate() call; halved on out-of-memory. Not in the resume hash


def recaption_rows(keys: Sequence[str], image_of: Callable[[str], bytes],
                   generate: Callable[[list[Image.Image]], list[str]], config: RecaptionConfig = RecaptionConfig(),
                   out_of_memory: Callable[[BaseException], bool] = is_out_of_memory,
                   on_oom: Callable[[], None] = lambda: None) -> tuple[pd.DataFrame, dict]:
    """(key, recaption, recaption_error) for every key, in order, and the step's counters.

    Images are read (`image_of(key)`) and decoded one batch at a time. A batch that runs out of memory is
    retried at half the size (down to one image; the smaller size is kept for the rest of the shard, the
    pressure being the device's); one image that runs out of memory alone gets the error. Any other failure of
    a batch is retried image by image, so one bad image costs only its own row; when every image of a batch
    of two or more fails alone too, the model is broken, not the images, and the error is raised. An empty
    caption from a batch of several is generated again alone (padding can differ), then recorded as `empty`.
    """
    n = len(keys)
    texts, errors = [""] * n, [None] * n
    counts = {"oom_retries": 0, "empty_retries": 0, "smallest_batch": config.batch_size}
    size = max(1, config.batch_size)
    for start in range(0, n, config.batch_size):
        pending = []
        for i in range(start, min(start + config.batch_size, n)):
            image, error = _read(keys[i], image_of)
            if image is None:
                errors[i] = error
            else:
                pending.append((i, image))
        while pending:
            part, pending = pending[:size], pending[size:]
            try:
                got = generate([image for _, image in part])
            except Exception as error:
                if out_of_memory(error):
                    on_oom()
                    if len(part) > 1:
                        counts["oom_retries"] += 1
                        size = max(1, len(part) // 2)
                        counts["smallest_batch"] = min(counts["smallest_batch"], size)
                        pending = part + pending
                        continue
                    errors[part[0][0]] = _describe("out_of_memory", error)
                    continue
                got = _alone(part, generate, error, errors, out_of_memory)
            for (i, image), text in zip(part, got, strict=True):
                if text is None:
                    continue
                if not text and len(part) > 1:
                    counts["empty_retries"] += 1
                    text = _alone([(i, image)], generate, None, errors, out_of_memory)[0]
                    if text is None:
                        continue
                texts[i], errors[i] = (text, None) if text else ("", EMPTY)
    frame = pd.DataFrame({"key": pd.Series(list(keys), dtype="str"), "recaption": pd.Series(texts, dtype="str"),
                          "recaption_error": pd.Series(errors, dtype="str")})  # None: missing (null in parquet)
    kinds = dict(Counter(e.split(":", 1)[0] for e in errors if e is not None))
    return frame, {"rows": n, "errors": sum(kinds.values()), "error_kinds": kinds, **counts}


def _read(key: str, image_of: Callable[[str], bytes]) -> tuple[Image.Image | None, str | None]:
    """The stored image in RGB, or None and why it cannot be read or decoded."""
    try:
        with Image.open(io.BytesIO(image_of(key))) as image:
            image.load()  # a truncated file fails here, not inside the model
            return to_rgb(image), None
    except Exception as error:  # a missing blob, PIL's OSError, ValueError, DecompressionBombError...: this row's
        return None, _describe("decode_error", error)


def _alone(part: list, generate, batch_error: BaseException | None, errors: list, out_of_memory) -> list:
    """Each image of `part` generated alone: its text, or None with its error recorded. Raises `batch_error` when
    every image of a part of two or more fails."""
    got = []
    for i, image in part:
        try:
            got.append(generate([image])[0])
        except Exception as error:  # this image is the bad record (or, below, the model is broken)
            kind = "out_of_memory" if out_of_memory(error) else "generate_error"
            errors[i] = _describe(kind, error)
            got.append(None)
    if batch_error is not None and len(part) > 1 and all(t is None for t in got):
        raise batch_error
    return got


def _describe(kind: str, error: BaseException) -> str:
    return f"{kind}: {type(error).__name__}: {error}"[:ERROR_CHARS]
