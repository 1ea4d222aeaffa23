"""Benchmark: the embed step (tasks/embed.py) against a bare transformers forward of the same model.

embed_ratio_vs_forward = time(bare forward) / time(embed_pairs), the fastest of `--repeat` alternating rounds in
this same run (the machine is shared and noisy; images/s are printed for context). 1.0 would mean the step costs
nothing beyond the model; the target is >= 0.8.

Model: a base-size SigLIP2 in the FixRes layout of google/siglip2-base-patch16-256 (model type siglip, towers of
hidden 768 with 12 layers and 12 heads, 16 px patches of 256 px images, 64 text positions) with RANDOM weights
built locally (no weights can be downloaded here; tests/tiny_models.build_siglip2_base_fixres): it costs what
the real model costs and judges nothing. Its tokenizer is a 2,000-piece Gemma-style one (the real one has
256,000 pieces: a bigger lookup table, the same compute). Cached under --work.

Both sides, per round and per batch of --batch images: the same model object (same device and dtype), the same
images as encoded bytes in memory (the 32 real photos under ../shared/fixtures/images, read in place, cycled up
to --images), decoded with PIL, preprocessed by the same PIL SiglipImageProcessor, one image forward
(get_image_features) and one text forward (get_text_features) of the pairs' captions tokenized to the model's 64
positions, under torch.inference_mode. So the image path is like for like: ours runs with the align role served
by the same model, which embeds each image once, as the baseline does.

- ours: embed_pairs(frame, model, model) with the model from load_model(resolve_model(...)): also composites
  transparency on white, L2-normalises and checks every vector, lowercases captions (SigLIP2's training), counts
  each caption's tokens once more for caption_truncated, computes the cosines and builds both frames.
- forward: Image.open(...).convert("RGB"), processor(images=...), model.get_image_features(pixel_values),
  tokenizer(captions, padding="max_length", max_length=64, truncation=True), model.get_text_features(input_ids);
  nothing else.

Captions: COCO-CN's human-written captions, or generated ones when that fixture is absent (bench/refine.py's).
Last stdout line: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models builds the random-weight checkpoints for tests and here
from bench.common import best_of, built_once, report  # noqa: E402 - after the checkout is on sys.path
from bench.refine import load_captions  # noqa: E402

FIXTURE_IMAGES = ROOT.parent / "shared/fixtures/images"
CHECKPOINT_VERSION = 1  # bump when the built checkpoints change: cached ones are rebuilt


def photos(root: Path = FIXTURE_IMAGES) -> list[bytes]:
    """The fixture photos' encoded bytes, read in place (never copied into the repository)."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"bench/embed.py needs the fixture photos under {root} (the shared fixtures beside the clone)")
    return [p.read_bytes() for p in paths]


def checkpoint(work: Path, size: str) -> Path:
    """The random-weight checkpoint of ``size`` ("base" or "tiny"), built once under ``work``."""
    from tiny_models import build_siglip2_base_fixres, build_tiny_siglip2

    def build(directory: Path) -> None:
        if size == "base":
            build_siglip2_base_fixres(directory)
        else:
            build_tiny_siglip2(directory, fixres=True)

    return built_once(work / f"siglip2-{size}-fixres-v{CHECKPOINT_VERSION}", build)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, help="alternating rounds; the fastest of each is compared (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds: a few minutes on 2 CPU cores")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, 4 images, one round: the smoke test")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (half precision on CUDA, as load_model does)")
    ap.add_argument("--batch", type=int, default=32, help="images per batch on both sides (default 32)")
    ap.add_argument("--images", type=int, help="images per round, the photos cycled (default: the 32 photos once)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "danqing-bench-embed"))
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.tiny else 2 if args.quick else 5)

    import pandas as pd
    import torch
    from PIL import Image

    from tasks.embed import EmbedConfig, embed_pairs
    from tasks.models import load_model, resolve_model

    blobs = photos()
    n = args.images or (4 if args.tiny else len(blobs))
    blobs = [blobs[i % len(blobs)] for i in range(n)]
    lines, _ = load_captions()
    texts = [lines[i % len(lines)] for i in range(n)]
    frame = pd.DataFrame({
        "key": [f"{i:020x}" for i in range(n)],
        "caption": texts,
        "image": pd.Series(blobs, dtype="object"),
        "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
    })
    size = "tiny" if args.tiny else "base"
    model = load_model(resolve_model("embed", str(checkpoint(Path(args.work), size))), device=args.device,
                       batch_size=args.batch)
    loaded = model._loaded  # the bare side drives the very same weights, processor and tokenizer
    config = EmbedConfig(batch_size=args.batch)
    text_kwargs = loaded.text.call_kwargs

    def ours():
        return embed_pairs(frame, model, model, config)

    def forward():
        out = []
        with torch.inference_mode():
            for start in range(0, n, args.batch):
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs[start : start + args.batch]]
                pixels = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
                image = loaded.model.get_image_features(pixel_values=pixels.to(loaded.device, dtype=loaded.dtype))
                ids = loaded.text.tokenizer(texts[start : start + args.batch], return_tensors="pt", **text_kwargs)
                text = loaded.model.get_text_features(input_ids=ids["input_ids"].to(loaded.device))
                out.append((image, text))
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    ours(), forward()  # warm-up: first-call allocations and kernel selection are in neither figure
    times, results = best_of({"ours": ours, "forward": forward}, repeat)
    scored, vectors = results["ours"]
    assert scored["drop_reason"].isna().all() and len(vectors) == n, "every fixture photo must embed"
    figures = {
        "model": f"siglip2-{size}-fixres (random weights)",
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "images": n,
        "batch": args.batch,
        "rounds": repeat,
        "threads": torch.get_num_threads(),
        "ours_s": round(times["ours"], 3),
        "forward_s": round(times["forward"], 3),
        "images_per_s": round(n / times["ours"], 2),
        "forward_images_per_s": round(n / times["forward"], 2),
        "embed_ratio_vs_forward": round(times["forward"] / times["ours"], 3),
    }
    return report(figures)


if __name__ == "__main__":
    main()
