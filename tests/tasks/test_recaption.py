"""The recaption step's batching, retries and failed rows, on fake generators and on a tiny random-weight LLaVA
(built here: placeholder weights, garbage text, real image-text-to-text loading and generation)."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from tasks.models import ModelLoadError, check_captioner, load_captioner, resolve_model
from tasks.recaption import COLUMNS, EMPTY, RecaptionConfig, recaption_rows


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40 + i, 32), (20 * i % 256, 90, 160)).save(out, "JPEG")
    return out.getvalue()


BLOBS = {f"k{i}": _jpeg(i) for i in range(7)}


class Fake:
    """A generator that records its batch sizes; per image `width`, a caption or an error decided by `rule`."""

    def __init__(self, rule=lambda width, batch: f"图{width}"):
        self.rule = rule
        self.calls: list[int] = []

    def __call__(self, images):
        self.calls.append(len(images))
        return [self.rule(image.width, len(images)) for image in images]


def _oom(*_):
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_every_key_in_order_in_batches_with_the_pinned_columns():
    fake = Fake()
    frame, stats = recaption_rows(list(BLOBS), BLOBS.__getitem__, fake, RecaptionConfig(batch_size=3))
    assert tuple(frame.columns) == COLUMNS and frame["key"].tolist() == list(BLOBS)
    assert frame["recaption"].tolist() == [f"图{40 + i}" for i in range(7)]
    assert frame["recaption_error"].isna().all() and fake.calls == [3, 3, 1]
    assert stats == {"rows": 7, "errors": 0, "error_kinds": {}, "oom_retries": 0, "empty_retries": 0,
                     "smallest_batch": 3}


def test_out_of_memory_halves_the_batch_down_to_one_then_records_the_error():
    def rule(width, batch):  # a batch of more than one image never fits; image k5 does not fit even alone
        if batch > 1 or width == 45:
            _oom()
        return "ok"

    fake = Fake(rule)
    frees = []
    frame, stats = recaption_rows(list(BLOBS), BLOBS.__getitem__, fake, RecaptionConfig(batch_size=4),
                                  on_oom=lambda: frees.append(1))
    assert fake.calls[:3] == [4, 2, 1] and set(fake.calls[3:]) == {1}  # halved, and kept small for the shard
    assert frame.loc[frame["key"] != "k5", "recaption"].eq("ok").all()
    row = frame.set_index("key").loc["k5"]
    assert row["recaption"] == "" and row["recaption_error"].startswith("out_of_memory: RuntimeError: CUDA out of")
    assert stats["errors"] == 1 and stats["error_kinds"] == {"out_of_memory": 1} and stats["smallest_batch"] == 1
    assert stats["oom_retries"] == 2 and len(frees) >= 3


def test_an_empty_caption_is_retried_alone_once_then_recorded_as_empty():
    fake = Fake(lambda width, batch: "" if width == 41 or (width == 42 and batch > 1) else "好")
    frame, stats = recaption_rows(list(BLOBS)[:4], BLOBS.__getitem__, fake, RecaptionConfig(batch_size=4))
    assert frame["recaption"].tolist() == ["好", "", "好", "好"]  # k2 was empty only inside the batch
    assert frame["recaption_error"].tolist()[1] == EMPTY and frame["recaption_error"].isna().sum() == 3
    assert fake.calls == [4, 1, 1] and stats["empty_retries"] == 2 and stats["error_kinds"] == {"empty": 1}


def test_an_unreadable_image_is_a_row_error_and_never_reaches_the_model():
    blobs = {**BLOBS, "k1": b"\xff\xd8 truncated jpeg", "k2": _jpeg(2)[:60]}
    fake = Fake()
    frame, stats = recaption_rows([*blobs, "missing"], blobs.__getitem__, fake, RecaptionConfig(batch_size=8))
    errors = frame.set_index("key")["recaption_error"]
    assert errors[["k1", "k2", "missing"]].str.startswith("decode_error: ").all()
    assert errors.drop(["k1", "k2", "missing"]).isna().all() and fake.calls == [5]
    assert stats["error_kinds"] == {"decode_error": 3}


def test_one_image_the_model_refuses_costs_its_row_but_a_broken_model_raises():
    def picky(width, batch):
        if width == 43:
            raise ValueError("processor refused it")
        return "好"

    frame, _ = recaption_rows(list(BLOBS), BLOBS.__getitem__, Fake(picky), RecaptionConfig(batch_size=4))
    assert frame.set_index("key").loc["k3", "recaption_error"] == "generate_error: ValueError: processor refused it"
    assert frame["recaption_error"].notna().sum() == 1

    def broken(width, batch):
        raise TypeError("generate() got an unexpected keyword")

    with pytest.raises(TypeError, match="unexpected keyword"):
        recaption_rows(list(BLOBS), BLOBS.__getitem__, Fake(broken), RecaptionConfig(batch_size=4))


def test_no_rows_give_an_empty_frame_with_the_columns():
    frame, stats = recaption_rows([], BLOBS.__getitem__, Fake())
    assert tuple(frame.columns) == COLUMNS and len(frame) == 0 and stats["rows"] == 0


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("vlm") / "llava")


def test_tiny_llava_generates_one_string_per_image_batched_as_alone(tiny_vlm):
    """The real path (AutoProcessor with the PIL image processor, AutoModelForImageTextToText, chat template,
    left padding): a batch gives what each image gives alone, for images of different sizes."""
    captioner = load_captioner(resolve_model("recaption", str(tiny_vlm)), device="cpu")
    assert load_captioner(resolve_model("recaption", str(tiny_vlm)), device="cpu") is captioner  # loaded once
    images = [Image.open(io.BytesIO(BLOBS[k])) for k in ("k0", "k3", "k6")]
    prompt = RecaptionConfig().prompt
    assert "<image>" in captioner.prompt_text(prompt) and prompt in captioner.prompt_text(prompt)
    batch = captioner.generate(images, prompt, 6)
    assert len(batch) == 3 and all(isinstance(t, str) and t for t in batch)
    assert batch == [captioner.generate([image], prompt, 6)[0] for image in images]
    assert captioner.identity["revision"].startswith("sha256:")
    frame, stats = recaption_rows(["k0", "k3"], BLOBS.__getitem__, lambda ims: captioner.generate(ims, prompt, 4))
    assert stats["errors"] == 0 and frame["recaption"].str.len().gt(0).all()
    assert isinstance(frame, pd.DataFrame)


def test_a_model_that_is_not_image_text_to_text_is_refused_before_any_work(tmp_path):
    from tiny_models import build_tiny_image_classifier

    not_vlm = build_tiny_image_classifier(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="is not an image-text-to-text model"):
        check_captioner(resolve_model("recaption", str(not_vlm)))
    with pytest.raises(ModelLoadError, match="no placeholder"):
        check_captioner(resolve_model("recaption", "placeholder"))
    with pytest.raises(ModelLoadError, match="no such local directory"):
        resolve_model("recaption", "./no/such/vlm")


def test_a_processor_without_a_chat_template_gets_its_image_token_before_the_prompt():
    from types import SimpleNamespace

    from tasks.models import Captioner

    paligemma_like = Captioner(None, SimpleNamespace(chat_template=None, image_token="<image>"), "cpu", None, {})
    assert paligemma_like.prompt_text("描述") == "<image>描述"
