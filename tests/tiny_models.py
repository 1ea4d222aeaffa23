"""Builds tiny random-weight SigLIP, SigLIP2, Chinese-CLIP, BERT-classifier, ViT-classifier and LLaVA checkpoints
offline, for tests (and one base-size SigLIP2 for the embed benchmark).

The weights are random placeholders: they exercise the real transformers loading, tokenizer and
image-processor code, and judge nothing (random weights even collapse distinct images together).
Tokenizers are real: a sentencepiece model trained here in milliseconds, a BERT vocabulary of
characters. Their training text is the COCO-CN captions read in place when the shared fixtures are
present, else generated text with the same kind of characters.
"""

from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared/fixtures/images/coco_cn/coco-cn_ext.icap2020.txt"
ENGLISH = ["a photo of a cat", "a dog on the grass", "two people riding bikes", "a red car in the city"]
UNSEEN_CHAR = "龘"  # kept out of every tiny vocabulary so tests can count a known unknown token
HIDDEN = 32  # tiny towers: 2 layers, 2 heads, hidden 32
SEED = 0
# google/siglip2-base-patch16-256's towers (both): what a benchmark needs to cost what the default model costs.
BASE_TOWER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


def build_tiny_siglip2(directory: str | Path, *, fixres: bool = False) -> Path:
    """A tiny random-weight SigLIP2 checkpoint in ``directory``; random placeholder weights that judge nothing.

    The default (NaFlex) layout: ``Siglip2Model``, ``Siglip2ImageProcessor`` (16 patches of 16 px)
    and a Gemma tokenizer saved as ``GemmaTokenizer``, as the hub's SigLIP2 repos declare it
    (transformers 5 loads ``Siglip2Tokenizer`` for model type ``siglip2``). ``fixres=True`` builds
    the FixRes layout of ``google/siglip2-base-patch16-256``, the project's default: model type
    ``siglip`` (``SiglipModel``, ``SiglipImageProcessor``) with the same Gemma tokenizer, which
    transformers then loads as a plain ``GemmaTokenizer``.
    """
    root = _fresh(directory)
    vocab_size, ids = _gemma_tokenizer(root)
    if fixres:
        _save_siglip(root, vocab_size, ids)
        return root

    from transformers import Siglip2Config, Siglip2Model, Siglip2TextConfig, Siglip2VisionConfig
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    config = Siglip2Config(
        text_config=Siglip2TextConfig(vocab_size=vocab_size, max_position_embeddings=16, **ids, **_tower()),
        vision_config=Siglip2VisionConfig(num_patches=16, patch_size=16, **_tower()),
    )
    _save_model(Siglip2Model, config, root)
    Siglip2ImageProcessorPil(max_num_patches=16, patch_size=16).save_pretrained(root)
    return root


def build_siglip2_base_fixres(directory: str | Path) -> Path:
    """A base-size SigLIP2 in the FixRes layout of ``google/siglip2-base-patch16-256`` (model type ``siglip``;
    towers of hidden 768, 12 layers, 12 heads; 16 px patches of 256 px images; 64 text positions) with RANDOM
    weights, for benchmarks: it computes what the real model computes and judges nothing. Its vocabulary is the
    tiny Gemma-style tokenizer's (2,000 pieces, not 256,000): the embedding table's size costs memory, not time.
    """
    root = _fresh(directory)
    vocab_size, ids = _gemma_tokenizer(root)
    _save_siglip(root, vocab_size, ids, tower=BASE_TOWER, image_size=256, positions=64)
    return root


def _gemma_tokenizer(root: Path) -> tuple[int, dict]:
    """A Gemma-style sentencepiece tokenizer saved in ``root`` as ``GemmaTokenizer``; its size and special ids."""
    from transformers import GemmaTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.model").write_bytes(
            _sentencepiece(
                model_type="bpe",
                vocab_size=2000,
                byte_fallback=True,  # as Gemma: unseen characters become bytes, never <unk>
                pad_id=0,
                eos_id=1,
                bos_id=2,
                unk_id=3,
                pad_piece="<pad>",
                eos_piece="<eos>",
                bos_piece="<bos>",
                unk_piece="<unk>",
            )
        )
        tokenizer = GemmaTokenizer.from_pretrained(scratch)
    tokenizer.init_kwargs.pop("vocab_file", None)  # else the scratch path would be written into the config
    tokenizer.save_pretrained(root)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    ids["eos_token_id"] = tokenizer.eos_token_id
    return len(tokenizer), ids


def build_tiny_siglip(directory: str | Path) -> Path:
    """A tiny SigLIP checkpoint (``SiglipModel``, ``SiglipTokenizer``); random placeholder weights, judges nothing."""
    from transformers import SiglipTokenizer

    root = _fresh(directory)
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "spiece.model"
        model_file.write_bytes(
            _sentencepiece(
                model_type="unigram",
                vocab_size=1500,
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=-1,
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
            )
        )
        tokenizer = SiglipTokenizer(vocab_file=str(model_file))
        tokenizer.save_pretrained(root)  # copies spiece.model next to the config; the scratch path is not kept
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id}
    _save_siglip(root, len(tokenizer), ids)
    return root


def build_tiny_chinese_clip(directory: str | Path) -> Path:
    """A tiny Chinese-CLIP checkpoint (``ChineseCLIPModel``, ``BertTokenizer``); random weights, judge nothing."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel
    from transformers.models.chinese_clip.configuration_chinese_clip import (
        ChineseCLIPTextConfig,
        ChineseCLIPVisionConfig,
    )
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    root = _fresh(directory)
    vocab_size = _bert_tokenizer(root)
    config = ChineseCLIPConfig(
        text_config=ChineseCLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=64, **_tower()),
        vision_config=ChineseCLIPVisionConfig(image_size=32, patch_size=16, projection_dim=16, **_tower()),
        projection_dim=16,
    )
    _save_model(ChineseCLIPModel, config, root)
    square = {"height": 32, "width": 32}
    ChineseCLIPImageProcessorPil(size=square, crop_size=square).save_pretrained(root)
    return root


def build_tiny_text_classifier(directory: str | Path, labels: tuple[str, ...] = ("safe", "nsfw"),
                               bias: dict[str, float] | None = None, multi_label: bool = False) -> Path:
    """A tiny ``BertForSequenceClassification`` with a character ``BertTokenizer``; random weights, judge nothing.

    ``bias`` is added to the head's bias per label, so a test can make one label win for every text.
    """
    from transformers import BertConfig, BertForSequenceClassification

    root = _fresh(directory)
    config = BertConfig(
        vocab_size=_bert_tokenizer(root), max_position_embeddings=64, id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification", **_tower(),
    )
    _save_model(BertForSequenceClassification, config, root)
    _bias_head(BertForSequenceClassification, root, labels, bias)
    return root


def build_tiny_image_classifier(directory: str | Path, labels: tuple[str, ...] = ("normal", "nsfw"),
                                bias: dict[str, float] | None = None) -> Path:
    """A tiny ``ViTForImageClassification`` with its ``ViTImageProcessor`` (PIL, 32 px); random weights, judge nothing.

    ``bias`` is added to the head's bias per label, so a test can make one label win for every image.
    """
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    root = _fresh(directory)
    config = ViTConfig(image_size=32, patch_size=16, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)}, **_tower())
    _save_model(ViTForImageClassification, config, root)
    _bias_head(ViTForImageClassification, root, labels, bias)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root)
    return root


# A LLaVA-style prompt: the chat template the tiny VLM's processor is saved with.
LLAVA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tiny_llava(directory: str | Path) -> Path:
    """A tiny random-weight LLaVA (``LlavaForConditionalGeneration``: a CLIP vision tower, a Llama decoder) with its
    real ``LlavaProcessor`` (PIL ``CLIPImageProcessor``, 32 px; a character-level tokenizer built with the
    ``tokenizers`` library, LLaVA's special tokens included; a chat template). It generates garbage text: random
    placeholder weights that exercise the image-text-to-text path and judge nothing."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = _fresh(directory)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    characters = sorted({c for line in _training_text() for c in line if not c.isspace()})
    ascii_ = [chr(c) for c in range(32, 127) if chr(c) not in characters]
    vocab = {token: i for i, token in enumerate([*specials, *characters, *ascii_, "\n"])}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # 2x2 patches and CLIP's class token, which the "default" strategy drops: 4 image tokens per image.
    LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=16, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE).save_pretrained(root)
    text = LlamaConfig(vocab_size=len(vocab), max_position_embeddings=256, num_key_value_heads=2,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], **_tower())
    vision = CLIPVisionConfig(image_size=32, patch_size=16, projection_dim=HIDDEN, **_tower())
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    _save_model(LlavaForConditionalGeneration, config, root)
    return root


def _bias_head(model_class, root: Path, labels: tuple[str, ...], bias: dict[str, float] | None) -> None:
    """Adds ``bias`` to the saved classifier head's bias, per label."""
    import torch

    if not bias:
        return
    model = model_class.from_pretrained(root)
    with torch.no_grad():
        for label, value in bias.items():
            model.classifier.bias[labels.index(label)] += value
    model.save_pretrained(root)


def _bert_tokenizer(root: Path) -> int:
    """A character vocabulary (plus a few English words) and its BertTokenizer saved in ``root``; its size."""
    from transformers import BertTokenizer

    characters = sorted({c for line in _training_text() for c in line if not c.isspace()} - {UNSEEN_CHAR})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in letters)]
    vocab += sorted({word for line in ENGLISH for word in line.split()} - set(vocab))
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5: BertTokenizer(vocab_file=...) silently ignores the file and maps every token to
    # [UNK]; from_pretrained on the directory (or vocab=path) reads it.
    BertTokenizer.from_pretrained(root).save_pretrained(root)
    return len(vocab)


def _save_siglip(root: Path, vocab_size: int, ids: dict, tower: dict | None = None, image_size: int = 32,
                 positions: int = 16) -> None:
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tower = tower or _tower()
    config = SiglipConfig(
        text_config=SiglipTextConfig(vocab_size=vocab_size, max_position_embeddings=positions, **ids, **tower),
        vision_config=SiglipVisionConfig(image_size=image_size, patch_size=16, **tower),
    )
    _save_model(SiglipModel, config, root)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(root)


def _tower() -> dict:
    return {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2}


def _save_model(model_class, config, root: Path) -> None:
    import torch

    with torch.random.fork_rng():  # seeded weights without disturbing the caller's random state
        torch.manual_seed(SEED)
        model_class(config).save_pretrained(root)


def _sentencepiece(**options) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()),
        model_writer=model,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may not fill the vocabulary
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def _training_text() -> list[str]:
    if CAPTIONS.is_file():
        with CAPTIONS.open(encoding="utf-8") as lines:
            # Lines are "<image id>#<n>\t<caption>"; 3,000 captions train a tokenizer in ~0.1 s.
            captions = [line.rstrip("\n").split("\t", 1)[-1] for _, line in zip(range(3000), lines, strict=False)]
    else:
        generator = random.Random(SEED)
        common = [chr(code) for code in range(0x4E00, 0x4E00 + 3000, 3)]  # CJK block, every third character
        captions = ["".join(generator.choices(common, k=generator.randint(5, 20))) for _ in range(2000)]
    return [caption.replace(UNSEEN_CHAR, "") for caption in captions] + ENGLISH * 5


def _fresh(directory: str | Path) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: tiny checkpoints are built into an empty directory")
    return root
