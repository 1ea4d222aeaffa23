"""Tests for tasks.models: the placeholder's dedup behaviour, tiny real-architecture checkpoints (embedding models
and the NSFW image classifier), revisions, resolution errors."""

import io
import itertools
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from _fixtures import FIXTURES, ROOT
from PIL import Image, ImageEnhance
from tiny_models import (
    UNSEEN_CHAR,
    build_tiny_chinese_clip,
    build_tiny_image_classifier,
    build_tiny_siglip,
    build_tiny_siglip2,
    build_tiny_text_classifier,
)

from tasks.models import (
    DEFAULT_MODELS,
    NSFW_IMAGE_LABELS,
    PLACEHOLDER,
    EmbeddingModel,
    ImageClassifier,
    ModelLoadError,
    PlaceholderModel,
    check_image_classifier,
    count_unknown_tokens,
    load_image_classifier,
    load_model,
    model_revision,
    resolve_model,
)
from tasks.models import resolve as resolve_module
from tasks.models.embedding import l2_normalise

FIXTURE_IMAGES = FIXTURES / "images"
DUPLICATE_DISTANCE = 0.1  # the paper's dedup link threshold (cosine distance)
QUICK_S = 2.0  # an offline resolution must answer within this, not after huggingface_hub's ~23 s of retries
CHINESE = ["一只猫坐在桌子上", "两个人在海边骑自行车", "红色的汽车停在城市街道上"]


def fixture_photos() -> list[Path]:
    if not FIXTURE_IMAGES.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"fixture folder {FIXTURE_IMAGES} is missing under CI")
        pytest.skip(f"fixture folder {FIXTURE_IMAGES} is absent (the shared fixtures sit beside the clone)")
    return sorted(p for p in FIXTURE_IMAGES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def synthetic_images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    gradient = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1)))  # grayscale, 3:1 wide
    transparent = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    transparent.paste((200, 30, 30, 255), (10, 10, 30, 30))
    return [noise, gradient, transparent]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - a @ b.T


def near_duplicates(image: Image.Image) -> dict[str, Image.Image]:
    from tasks.models.embedding import to_rgb

    image = to_rgb(image)
    width, height = image.size
    variants = {}
    for quality in (90, 50):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        variants[f"jpeg q{quality}"] = load(io.BytesIO(buffer.getvalue()))
    for scale in (0.95, 1.05):
        variants[f"resized x{scale}"] = image.resize((round(width * scale), round(height * scale)))
    for factor in (0.9, 1.1):
        variants[f"brightness x{factor}"] = ImageEnhance.Brightness(image).enhance(factor)
    return variants


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: patch the value it acts on as well.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, but the endpoint is a closed port on 127.0.0.1: refused at once, no internet touched."""
    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")


# --- placeholder -------------------------------------------------------------------------------


def test_placeholder_is_deterministic_across_model_objects():
    images, texts = synthetic_images(), [*CHINESE, "", "Hello"]
    first, second = PlaceholderModel(), PlaceholderModel()
    assert isinstance(first, EmbeddingModel)
    assert np.array_equal(first.embed_images(images), second.embed_images(images))
    assert np.array_equal(first.embed_texts(texts), second.embed_texts(texts))
    assert first.identity == {
        "name": PLACEHOLDER,
        "revision": first.identity["revision"],
        "dim": 256,
        "placeholder": True,
    }


def test_placeholder_text_vectors_do_not_depend_on_the_process_hash_seed():
    code = (
        "from tasks.models import PlaceholderModel; print(PlaceholderModel().embed_texts(['一只猫']).tobytes().hex())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_placeholder_shapes_dtype_and_norms():
    model = PlaceholderModel()
    images = model.embed_images(synthetic_images())
    texts = model.embed_texts([*CHINESE, ""])
    assert images.shape == (3, 256) and texts.shape == (4, 256)
    assert images.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert model.embed_images([]).shape == (0, 256) and model.embed_texts([]).shape == (0, 256)


def test_placeholder_flat_images_get_a_fixed_unit_vector_not_nan():
    model = PlaceholderModel()
    flat = model.embed_images([Image.new("RGB", (50, 50), (128, 128, 128)), Image.new("L", (20, 90), 255)])
    textured = model.embed_images(synthetic_images()[:1])
    assert np.isfinite(flat).all()
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(flat[0], flat[1])
    # The fixed vector is orthogonal to every mean-centred thumbnail: never a duplicate of a real image.
    np.testing.assert_allclose(cosine_distance(flat, textured), 1.0, atol=1e-5)


def test_l2_normalise_gives_nan_for_a_degenerate_row_unless_a_fallback_is_given():
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0]])
    out = l2_normalise(rows)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.6, 0.8])
    assert np.isnan(out[1:]).all()
    fallback = np.array([1.0, 0.0])
    with_fallback = l2_normalise(rows, fallback)
    np.testing.assert_allclose(with_fallback[1], fallback)  # only a zero row has a fallback: NaN/inf stay NaN
    assert np.isnan(with_fallback[2:]).all()


def test_placeholder_never_truncates_texts():
    assert PlaceholderModel().text_truncated(["猫" * 10_000, ""]).tolist() == [False, False]


def test_placeholder_texts_sharing_characters_are_closer_than_unrelated_ones():
    vectors = PlaceholderModel().embed_texts(["一只猫坐在桌子上", "一只猫坐在椅子上", "红色的汽车停在街道"])
    similar, unrelated = cosine_distance(vectors[:1], vectors[1:])[0]
    assert similar < 0.5 < unrelated


def test_placeholder_links_near_duplicates_of_every_fixture_photo():
    model = PlaceholderModel()
    worst = (0.0, "")
    for path in fixture_photos():
        original = load(path)
        variants = near_duplicates(original)
        distances = cosine_distance(model.embed_images(list(variants.values())), model.embed_images([original]))[:, 0]
        for kind, distance in zip(variants, distances, strict=True):
            worst = max(worst, (float(distance), f"{path.name} {kind}"))
    assert worst[0] < DUPLICATE_DISTANCE, f"near-duplicate too far apart: {worst}"


def test_placeholder_keeps_distinct_fixture_photos_apart():
    paths = fixture_photos()
    vectors = PlaceholderModel().embed_images([load(path) for path in paths])
    distances = cosine_distance(vectors, vectors)
    closest = min(
        (distances[i, j], paths[i].name, paths[j].name) for i, j in itertools.combinations(range(len(paths)), 2)
    )
    assert len(paths) >= 20
    assert closest[0] > DUPLICATE_DISTANCE, f"distinct photos linked as duplicates: {closest}"


# --- tiny transformers checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    builders = {
        "siglip2": build_tiny_siglip2,
        "siglip2-fixres": lambda root: build_tiny_siglip2(root, fixres=True),
        "siglip": build_tiny_siglip,
        "chinese_clip": build_tiny_chinese_clip,
        "nsfw": build_tiny_image_classifier,
        "nsfw_gantman": lambda root: build_tiny_image_classifier(
            root, labels=("drawings", "hentai", "neutral", "porn", "sexy"), bias={"porn": 5.0}
        ),
        "text_classifier": build_tiny_text_classifier,
    }
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in builders.items()}


@pytest.mark.parametrize("kind", ["siglip2", "siglip2-fixres", "siglip", "chinese_clip"])
def test_tiny_checkpoint_loads_and_embeds_normalised_float32(tiny, kind):
    resolved = resolve_model("embed", str(tiny[kind]))
    assert (resolved.source, resolved.placeholder, resolved.warning) == ("local", False, None)
    assert resolved.name == str(tiny[kind].resolve())

    model = load_model(resolved, device="cpu", batch_size=2)  # 3 rows in batches of 2: the batching path runs
    images = model.embed_images(synthetic_images())
    texts = model.embed_texts(CHINESE)
    for vectors in (images, texts):
        assert vectors.shape == (3, model.dim) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(model, EmbeddingModel)
    assert model.identity["placeholder"] is False and model.identity["dim"] == model.dim
    assert model.identity["revision"].startswith("sha256:")
    assert model.identity["revision"] == model_revision(resolved)  # known before loading, for resume markers
    assert model.embed_images([]).shape == (0, model.dim)
    # Loaded once per (name, device): a second call reuses the weights.
    assert load_model(resolved, device="cpu")._loaded is model._loaded


@pytest.mark.parametrize(("kind", "context"), [("siglip2", 16), ("siglip2-fixres", 16), ("siglip", 16),
                                             ("chinese_clip", 52)])  # text positions (Chinese-CLIP: its 52)
def test_text_truncated_says_which_texts_exceed_the_text_context(tiny, kind, context):
    model = load_model(resolve_model("embed", str(tiny[kind])), device="cpu")
    texts = ["猫" * n for n in range(1, 3 * context)]
    truncated = model.text_truncated(texts)
    assert truncated.dtype == bool and truncated.shape == (len(texts),)
    # Monotone in the length: short texts fit, long ones do not (the switch depends on the tokenizer's merges).
    first = int(np.argmax(truncated))
    assert 0 < first and not truncated[:first].any() and truncated[first:].all()
    # A truncated text embeds like a longer version of it (only its start was seen); a short one does not.
    for i, same in ((first, True), (first // 2, False)):
        pair = model.embed_texts([texts[i], texts[i] + "狗" * context])
        assert np.allclose(pair[0], pair[1], atol=1e-5) == same, (i, same)
    assert model.text_truncated([]).shape == (0,)


def test_a_zero_output_of_the_model_is_nan_not_a_substitute(tiny, monkeypatch):
    import torch

    model = load_model(resolve_model("embed", str(tiny["siglip"])), device="cpu")
    real = model._loaded.model.get_image_features

    def zero_second_row(pixel_values):
        features = real(pixel_values=pixel_values)
        features = features if torch.is_tensor(features) else features.pooler_output
        features[1:2] = 0.0
        return features

    monkeypatch.setattr(model._loaded.model, "get_image_features", zero_second_row)
    vectors = model.embed_images(synthetic_images())
    assert np.isfinite(vectors[[0, 2]]).all() and np.isnan(vectors[1]).all()


@pytest.mark.parametrize("kind", ["siglip2", "siglip2-fixres"])
def test_siglip2_texts_are_lowercased_as_in_training(tiny, kind):
    # The FixRes layout declares GemmaTokenizer, which does not lowercase: the loader must.
    model = load_model(resolve_model("embed", str(tiny[kind])), device="cpu")
    upper, lower = model.embed_texts(["A RED CAR 一只猫", "a red car 一只猫"])
    np.testing.assert_allclose(upper, lower, atol=1e-6)


def test_chinese_clip_tokenizer_does_not_map_chinese_to_unk(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["chinese_clip"])
    ids = tokenizer(CHINESE[0], add_special_tokens=False)["input_ids"]
    assert len(ids) == len(CHINESE[0]) and tokenizer.unk_token_id not in ids
    resolved = resolve_model("tokenizer", str(tiny["chinese_clip"]))
    assert count_unknown_tokens(resolved, [CHINESE[0], f"{UNSEEN_CHAR}猫{UNSEEN_CHAR}"]) == [0, 2]


def test_count_unknown_tokens_per_tokenizer_family(tiny):
    texts = [CHINESE[1], f"一只{UNSEEN_CHAR}"]
    assert count_unknown_tokens(resolve_model("tokenizer", str(tiny["siglip"])), texts) == [0, 1]
    # Gemma (SigLIP2) falls back to bytes: an unseen character is never unknown.
    assert count_unknown_tokens(resolve_model("tokenizer", str(tiny["siglip2"])), texts) == [0, 0]
    assert count_unknown_tokens(resolve_model("tokenizer", PLACEHOLDER), texts) == [0, 0]


def test_tiny_builders_work_without_the_caption_fixture(monkeypatch, tmp_path):
    monkeypatch.setattr(tiny_models, "CAPTIONS", tmp_path / "absent.txt")
    for name, build in (("chinese_clip", build_tiny_chinese_clip), ("siglip", build_tiny_siglip)):
        resolved = resolve_model("tokenizer", str(build(tmp_path / name)))
        assert count_unknown_tokens(resolved, ["一七", UNSEEN_CHAR]) == [0, 1]


def test_local_revision_follows_the_settings_files(tmp_path):
    import shutil

    from tasks.models.load import revision

    root = build_tiny_siglip(tmp_path / "a")
    before = revision(str(root), "local", True)
    assert before.startswith("sha256:")
    assert before == revision(str(shutil.copytree(root, tmp_path / "b")), "local", True)  # not the path
    config = root / "preprocessor_config.json"
    config.write_text(config.read_text().replace('"height": 32', '"height": 64'))  # same size, other setting
    assert revision(str(root), "local", True) != before


def test_a_hub_model_from_the_cache_reports_its_commit(tmp_path, monkeypatch, offline):
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--danqing-tests--tiny-siglip"
    shutil.copytree(build_tiny_siglip(tmp_path / "tiny"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = resolve_model("embed", "danqing-tests/tiny-siglip")
    assert (resolved.source, resolved.placeholder) == ("hub", False)
    assert load_model(resolved, device="cpu").identity["revision"] == commit == model_revision(resolved)


# --- the NSFW image classifier --------------------------------------------------------------------------------


def test_tiny_image_classifier_loads_once_and_gives_float32_probabilities(tiny):
    resolved = resolve_model("nsfw_image", str(tiny["nsfw"]))
    assert (resolved.source, resolved.placeholder) == ("local", False)
    classifier = load_image_classifier(resolved, device="cpu")
    assert isinstance(classifier, ImageClassifier) and classifier.labels == ("normal", "nsfw")
    assert classifier.identity["revision"].startswith("sha256:")
    assert classifier.identity["revision"] == model_revision(resolved)
    classifier.batch_size = 2  # 3 images in batches of 2: the batching path runs
    probabilities = classifier.probabilities(synthetic_images())
    assert probabilities.shape == (3, 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    score, top = classifier.unsafe(synthetic_images(), ["NSFW"])
    assert score.dtype == np.float32 and top.dtype == bool
    np.testing.assert_allclose(score, probabilities[:, 1])
    assert top.tolist() == (probabilities[:, 1] > probabilities[:, 0]).tolist()
    assert classifier.unsafe([], NSFW_IMAGE_LABELS)[0].shape == (0,)
    assert load_image_classifier(resolved, device="cpu") is classifier


def test_unsafe_means_the_top_label_is_a_highest_risk_one(tiny):
    classifier = load_image_classifier(resolve_model("nsfw_image", str(tiny["nsfw_gantman"])), device="cpu")
    score, top = classifier.unsafe(synthetic_images(), NSFW_IMAGE_LABELS)  # porn wins, hentai is also unsafe
    assert top.all() and (score > 0.9).all()
    score, top = classifier.unsafe(synthetic_images(), ["hentai"])  # porn wins, but porn is not configured
    assert not top.any() and (score < 0.1).all()


def test_check_image_classifier_refuses_before_any_work(tiny):
    check_image_classifier(resolve_model("nsfw_image", str(tiny["nsfw"])), NSFW_IMAGE_LABELS)
    with pytest.raises(ValueError, match="image.nsfw_labels"):
        check_image_classifier(resolve_model("nsfw_image", str(tiny["nsfw_gantman"])), ["nsfw", "explicit"])
    for kind in ("siglip", "text_classifier"):  # a dual encoder, a text classifier
        with pytest.raises(ModelLoadError, match="not an image classifier"):
            check_image_classifier(resolve_model("nsfw_image", str(tiny[kind])), NSFW_IMAGE_LABELS)
    with pytest.raises(ValueError, match="no placeholder"):
        load_image_classifier(resolve_model("nsfw_image", PLACEHOLDER))


def test_a_named_nsfw_image_model_that_cannot_load_is_a_clear_error(offline):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="danqing-tests/no-such-nsfw-model") as error:
        resolve_model("nsfw_image", "danqing-tests/no-such-nsfw-model")
    assert time.monotonic() - started < QUICK_S
    assert "HF_ENDPOINT" in str(error.value) and "modelscope" in str(error.value)
    with pytest.raises(ModelLoadError, match="/no/such/classifier"):
        resolve_model("nsfw_image", "/no/such/classifier")


def test_nsfw_image_classifier_through_modelscope(monkeypatch, tiny):
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = lambda model_id: str(tiny["nsfw"])
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    resolved = resolve_model("nsfw_image", "modelscope:iic/tiny-nsfw")
    check_image_classifier(resolved, ["nsfw"])
    assert load_image_classifier(resolved, device="cpu").unsafe(synthetic_images()[:1], ["nsfw"])[0].shape == (1,)


# --- resolution ----------------------------------------------------------------------------------


def test_placeholder_by_name_and_roles_without_default():
    resolved = resolve_model("embed", PLACEHOLDER)
    assert (resolved.placeholder, resolved.source, resolved.warning) == (True, "placeholder", None)
    assert isinstance(load_model(resolved), PlaceholderModel)
    assert model_revision(resolved) == PlaceholderModel().identity["revision"]
    assert DEFAULT_MODELS["nsfw_text"] is None
    no_default = resolve_model("nsfw_text", None)
    assert no_default.placeholder and "no default" in no_default.warning
    with pytest.raises(ValueError, match="unknown model role"):
        resolve_model("captioner", None)


def test_missing_or_empty_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="/no/such/dir") as missing:
        resolve_model("embed", "/no/such/dir")
    assert "HF_ENDPOINT" in str(missing.value) and "modelscope" in str(missing.value)
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model("embed", str(tmp_path))


def test_bogus_hub_id_fails_fast_offline(offline):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="danqing-tests/no-such-model"):
        resolve_model("align", "danqing-tests/no-such-model")
    assert time.monotonic() - started < QUICK_S


def test_bogus_hub_id_fails_fast_when_the_endpoint_is_unreachable(unreachable_hub):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="unreachable"):
        resolve_model("embed", "danqing-tests/no-such-model")
    assert time.monotonic() - started < QUICK_S


@pytest.mark.parametrize("network", ["offline", "unreachable_hub"])
def test_default_that_cannot_load_falls_back_to_placeholder_quickly(request, monkeypatch, network):
    request.getfixturevalue(network)
    # A default id that no cache can hold, so the result does not depend on this machine's HF cache.
    monkeypatch.setitem(resolve_module.DEFAULT_MODELS, "embed", "danqing-tests/absent-default")
    started = time.monotonic()
    resolved = resolve_model("embed", None)
    assert time.monotonic() - started < QUICK_S
    assert (resolved.placeholder, resolved.source, resolved.name) == (True, "placeholder", PLACEHOLDER)
    assert "danqing-tests/absent-default" in resolved.warning


def test_modelscope_without_the_package_says_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope` fail
    with pytest.raises(ModelLoadError, match="pip install modelscope"):
        resolve_model("embed", "modelscope:iic/some-model")


def test_modelscope_ids_load_through_the_package(monkeypatch, tiny):
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = lambda model_id: str(tiny["siglip"]) if model_id == "iic/tiny" else 1 / 0
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    resolved = resolve_model("embed", "modelscope:iic/tiny")
    assert (resolved.source, resolved.name, resolved.placeholder) == ("modelscope", "modelscope:iic/tiny", False)
    assert load_model(resolved, device="cpu").embed_texts(CHINESE[:1]).shape[0] == 1
    with pytest.raises(ModelLoadError, match="iic/broken"):
        resolve_model("embed", "modelscope:iic/broken")
