"""Benchmark: the recaption step (tasks/recaption.py) against a bare transformers generate() of the same model.

recaption_ratio_vs_generate = time(bare generate) / time(recaption_rows), the fastest of `--repeat` alternating
rounds in this same run (images/s printed for context). 1.0 would mean the step costs nothing beyond the model;
the target is >= 0.8.

Model: a tiny LLaVA with RANDOM weights built locally (tests/tiny_models.build_tiny_llava: a CLIP vision tower and
a Llama decoder of hidden 32, its real LlavaProcessor with the PIL CLIP image processor and a character-level
tokenizer): a placeholder that exercises the image-text-to-text path and judges nothing; its captions are garbage.
`--model DIR` times a real checkpoint instead (on a GPU machine, with `--device cuda`). Cached under --work.

Both sides, per round and per batch of --batch images: the same model object (same device and dtype), the same
images as encoded bytes in memory (the fixture photos under ../shared/fixtures/images, read in place, cycled up to
--images), decoded with PIL, the same prompt (the step's default) through the processor's chat template, greedy
generate() of --max-new-tokens new tokens under torch.inference_mode, the new tokens decoded.

- ours: recaption_rows(keys, image_of, captioner.generate, config) with the captioner from
  load_captioner(resolve_model(...)): also composites transparency on white, checks each caption for emptiness,
  records errors and builds the (key, recaption, recaption_error) frame.
- generate: Image.open(...).convert("RGB"), processor(images=..., text=..., padding=True), model.generate(...),
  tokenizer.batch_decode(...); nothing else.

Greedy decoding of the same batches gives both sides the same tokens, early ends of text included, except where
ours does its own work (counted in its time): an image with transparency is composited on white (one fixture photo
is RGBA), an empty caption from a batch is generated again alone; `differing_captions` counts those rows. Last
stdout line: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models builds the random-weight checkpoints for tests and here
from bench.common import best_of, built_once, report  # noqa: E402 - after the checkout is on sys.path
from bench.embed import photos  # noqa: E402

CHECKPOINT_VERSION = 1  # bump when the built checkpoint changes: a cached one is rebuilt


def checkpoint(work: Path) -> Path:
    """The tiny random-weight LLaVA, built once under ``work``."""
    from tiny_models import build_tiny_llava

    return built_once(work / f"llava-tiny-v{CHECKPOINT_VERSION}", build_tiny_llava)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, help="alternating rounds; the fastest of each is compared (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 32 images: about a minute on 2 CPU cores")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (half precision on CUDA, as load_captioner does)")
    ap.add_argument("--model", help="an image-text-to-text checkpoint directory (default: the tiny random LLaVA)")
    ap.add_argument("--batch", type=int, default=8, help="images per generate() on both sides (default 8)")
    ap.add_argument("--images", type=int, help="images per round, the photos cycled (default 64; --quick 32)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per caption (default 16)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "danqing-bench-recaption"))
    args = ap.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 5)
    n = args.images or (32 if args.quick else 64)

    import torch
    from PIL import Image

    from tasks.models import load_captioner, resolve_model
    from tasks.recaption import RecaptionConfig, recaption_rows

    blobs = photos()
    blobs = {f"{i:020x}": blobs[i % len(blobs)] for i in range(n)}
    keys = list(blobs)
    model_dir = Path(args.model) if args.model else checkpoint(Path(args.work))
    captioner = load_captioner(resolve_model("recaption", str(model_dir)), device=args.device)
    config = RecaptionConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    model, processor = captioner.model, captioner.processor
    tokenizer = processor.tokenizer
    text = captioner.prompt_text(config.prompt)

    def ours():
        return recaption_rows(keys, blobs.__getitem__,
                              lambda ims: captioner.generate(ims, config.prompt, config.max_new_tokens), config)

    def bare():
        out = []
        with torch.inference_mode():
            for start in range(0, n, args.batch):
                images = [Image.open(io.BytesIO(blobs[k])).convert("RGB") for k in keys[start : start + args.batch]]
                inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
                inputs = {k: v.to(captioner.device, dtype=captioner.dtype) if v.is_floating_point()
                          else v.to(captioner.device) for k, v in inputs.items()}
                ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    ours(), bare()  # warm-up: first-call allocations and kernel selection are in neither figure
    times, results = best_of({"ours": ours, "generate": bare}, repeat)
    frame, stats = results["ours"]
    assert len(frame) == n and stats["error_kinds"].keys() <= {"empty"}, stats
    figures = {
        "model": "llava-tiny (random weights, placeholder)" if not args.model else str(model_dir),
        "device": str(captioner.device),
        "dtype": str(captioner.dtype).removeprefix("torch."),
        "images": n,
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "rounds": repeat,
        "threads": torch.get_num_threads(),
        "ours_s": round(times["ours"], 3),
        "generate_s": round(times["generate"], 3),
        "images_per_s": round(n / times["ours"], 2),
        "generate_images_per_s": round(n / times["generate"], 2),
        # rows whose caption differs: ours composites transparency on white and regenerates empty captions alone
        "differing_captions": sum(a != b.strip() for a, b in zip(frame["recaption"], results["generate"], strict=True)),
        "recaption_ratio_vs_generate": round(times["generate"] / times["ours"], 3),
    }
    return report(figures)


if __name__ == "__main__":
    main()
