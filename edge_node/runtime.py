"""LiteRT backends behind one small interface, and a model runner that batches, quantizes and reads out.

Backends in priority order (``auto``): ``ai-edge-litert`` -> ``tflite-runtime`` -> ``tensorflow``
(``tf.lite.Interpreter``, deprecated in TF 2.21). ``tflite-runtime`` 2.14 is its last release and needs
numpy<2, so on this project's numpy 2 stack it is skipped by ``auto`` unless it imports.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edge_node.errors import BackendError, ModelError
from edge_node.preprocessing import normalize_fitted
from shared.schemas import ModelManifest
from shared.settings.edge import RuntimeSettings

logger = logging.getLogger(__name__)

BACKEND_ORDER: Final = ("ai-edge-litert", "tflite-runtime", "tensorflow")
# Batch sizes are padded up to these buckets so interpreters are not resized for every batch.
_MIN_BUCKET: Final = 1
# A resize re-allocates the interpreter's tensors (about a millisecond: a latency spike for that
# batch). Growing is immediate; shrinking waits for this many batches in a row that would fit the
# smaller size (padding a few rows costs microseconds), so light, uneven load does not resize back
# and forth between 1, 2 and 4.
SHRINK_AFTER_BATCHES: Final = 64


@dataclass(frozen=True, slots=True)
class Backend:
    """One LiteRT implementation: how to build an interpreter and load a delegate."""

    name: str
    interpreter_cls: Any
    load_delegate: Callable[..., Any]
    op_resolver_type: Any | None  # the enum to turn XNNPACK off, when the backend has one

    def make_interpreter(self, model_content: bytes, settings: RuntimeSettings) -> Any:
        """A LiteRT interpreter for ``model_content`` with the configured threads and delegate."""
        kwargs: dict[str, Any] = {"model_content": model_content, "num_threads": settings.num_threads}
        if settings.delegate is not None:
            kwargs["experimental_delegates"] = [
                self.load_delegate(settings.delegate, settings.delegate_options)
            ]
        if not settings.xnnpack and self.op_resolver_type is not None:
            kwargs["experimental_op_resolver_type"] = self.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            return self.interpreter_cls(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{self.name} cannot load the model: {exc}") from exc


def _import_backend(name: str) -> Backend:
    if name == "ai-edge-litert":
        module = importlib.import_module("ai_edge_litert.interpreter")
    elif name == "tflite-runtime":
        module = importlib.import_module("tflite_runtime.interpreter")
    elif name == "tensorflow":
        module = importlib.import_module("tensorflow").lite.experimental
        tf_lite = importlib.import_module("tensorflow").lite
        return Backend(
            name, tf_lite.Interpreter, module.load_delegate, getattr(module, "OpResolverType", None)
        )
    else:
        raise BackendError(f"unknown runtime backend {name!r}; choose one of {', '.join(BACKEND_ORDER)}")
    return Backend(name, module.Interpreter, module.load_delegate, getattr(module, "OpResolverType", None))


def load_backend(preference: str = "auto", importer: Callable[[str], Backend] = _import_backend) -> Backend:
    """The chosen backend, or with ``auto`` the first of ``BACKEND_ORDER`` that imports."""
    names = BACKEND_ORDER if preference == "auto" else (preference,)
    failures: list[str] = []
    for name in names:
        try:
            backend = importer(name)
        except ImportError as exc:  # includes numpy ABI mismatches surfacing as ImportError
            failures.append(f"{name}: {exc}")
            logger.debug("runtime backend %s unavailable: %s", name, exc)
            continue
        logger.info("runtime backend: %s", name)
        return backend
    raise BackendError("no LiteRT backend could be imported (" + "; ".join(failures) + ")")


def _bucket(n: int, max_batch: int) -> int:
    size = _MIN_BUCKET
    while size < n:
        size *= 2
    return min(max(size, n), max(max_batch, n))


class ModelRunner:
    """One interpreter with its preprocessing. Not thread-safe: exactly one worker owns it."""

    def __init__(self, interpreter: Any, manifest: ModelManifest, max_batch: int) -> None:
        self.interpreter = interpreter
        self.manifest = manifest
        self.max_batch = max_batch
        try:
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot allocate the model's tensors: {exc}") from exc
        inp = interpreter.get_input_details()
        out = interpreter.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ModelError(f"model has {len(inp)} inputs and {len(out)} outputs; expected 1 and 1")
        self._in = inp[0]
        self._out = out[0]
        self.input_index: int = int(self._in["index"])
        self.output_index: int = int(self._out["index"])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        in_scale, in_zero = self._in.get("quantization", (0.0, 0))
        out_scale, out_zero = self._out.get("quantization", (0.0, 0))
        self._in_q = (float(in_scale), int(in_zero)) if in_scale else None
        self._out_q = (float(out_scale), int(out_zero)) if out_scale else None
        norm = manifest.normalization
        self._mean = np.asarray(norm.mean, dtype=np.float32) if norm else None
        self._std = np.asarray(norm.std, dtype=np.float32) if norm else None
        self._batch = int(self._in["shape"][0])
        self._smaller_in_a_row = 0
        self.resizes = 0
        self.outputs_are_probabilities: bool | None = None
        self.check_against_manifest()

    @property
    def model_input_shape(self) -> list[int]:
        """The model's input shape without the batch dimension."""
        return [int(d) for d in self._in["shape"][1:]]

    @property
    def model_output_shape(self) -> list[int]:
        """The model's output shape without the batch dimension."""
        return [int(d) for d in self._out["shape"][1:]]

    def check_against_manifest(self) -> None:
        """Raise ``ModelError`` unless the model's shapes match its manifest."""
        m = self.manifest
        if self.model_input_shape != list(m.input_shape):
            raise ModelError(
                f"input shape {self.model_input_shape} does not match the manifest's {m.input_shape}"
            )
        if self.model_output_shape != list(m.output_shape):
            raise ModelError(
                f"output shape {self.model_output_shape} does not match the manifest's {m.output_shape}"
            )
        if self.input_dtype.name != m.input_dtype:
            raise ModelError(
                f"input dtype {self.input_dtype.name} does not match the manifest's {m.input_dtype}"
            )
        if self.output_dtype.name != m.output_dtype:
            raise ModelError(
                f"output dtype {self.output_dtype.name} does not match the manifest's {m.output_dtype}"
            )
        if self._mean is not None and self._mean.shape[0] != m.input_shape[-1]:
            raise ModelError(
                f"normalization has {self._mean.shape[0]} channels; the input has {m.input_shape[-1]}"
            )
        if self.input_dtype.kind in {"i", "u"} and self._in_q is None:
            raise ModelError(f"{self.input_dtype.name} input without quantization parameters")

    def _prepare(self, batch: np.ndarray, size: int) -> np.ndarray:
        """Normalise, quantize (int8/uint8 models) and pad to ``size`` rows, in few numpy calls.

        The rows are already the model's input (``edge_node.preprocessing.prepare_window`` at
        ingest); only the fitted normalisation is left, the same function the cloud trains with."""
        x = batch
        if self._mean is not None and self._std is not None:
            x = normalize_fitted(x, self._mean, self._std)
        if self._in_q is not None:
            scale, zero = self._in_q
            info = np.iinfo(self.input_dtype)
            q = x * np.float32(1.0 / scale)
            q += np.float32(zero)
            np.rint(q, out=q)
            np.clip(q, info.min, info.max, out=q)
            x = q
        n = x.shape[0]
        if size == n:
            return np.ascontiguousarray(x, dtype=self.input_dtype)
        padded = np.zeros((size, *x.shape[1:]), dtype=self.input_dtype)
        padded[:n] = x
        return padded

    def _size_for(self, n: int) -> int:
        """The tensor size to run ``n`` rows with: their bucket, or the current size while a smaller
        bucket has not yet been enough for SHRINK_AFTER_BATCHES batches in a row."""
        size = _bucket(n, self.max_batch)
        if size >= self._batch:
            self._smaller_in_a_row = 0
            return size
        self._smaller_in_a_row += 1
        if self._smaller_in_a_row < SHRINK_AFTER_BATCHES:
            return self._batch
        self._smaller_in_a_row = 0
        return size

    def _resize(self, batch_size: int) -> None:
        if batch_size != self._batch:
            self.interpreter.resize_tensor_input(self.input_index, [batch_size, *self.manifest.input_shape])
            self.interpreter.allocate_tensors()
            self._batch = batch_size
            self.resizes += 1

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) float32 for a float32 batch of shape (n, *input_shape)."""
        n = int(batch.shape[0])
        size = self._size_for(n)
        x = self._prepare(batch, size)
        self._resize(size)
        self.interpreter.set_tensor(self.input_index, x)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output_index)[:n]
        if self._out_q is not None:
            scale, zero = self._out_q
            raw = (out.astype(np.float32) - zero) * scale
        else:
            raw = out.astype(np.float32, copy=True)
        probs: np.ndarray = raw.reshape(n, -1)
        if self.outputs_are_probabilities is None:  # decided once, on the warm-up batch
            if not np.isfinite(probs).all():
                return probs
            self.outputs_are_probabilities = looks_like_probabilities(probs)
        result: np.ndarray = probs if self.outputs_are_probabilities else softmax(probs)
        return result


def looks_like_probabilities(out: np.ndarray) -> bool:
    """Rows in [0, 1] summing to ~1 (a softmax head, possibly int8-dequantized); else logits."""
    sums = out.sum(axis=1)
    return bool((out >= -1e-3).all() and (out <= 1 + 1e-3).all() and np.allclose(sums, 1.0, atol=0.05))


def softmax(out: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits."""
    shifted = out - out.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def to_probabilities(out: np.ndarray) -> np.ndarray:
    """Rows that already look like probabilities pass through; logits go through a softmax."""
    if not np.isfinite(out).all():
        return out  # the caller rejects or dead-letters non-finite outputs
    return out if looks_like_probabilities(out) else softmax(out)


def describe_model(backend: Backend, content: bytes, settings: RuntimeSettings) -> dict[str, Any]:
    """Input and output shapes and dtypes as the model declares them (for ``--model`` without manifest)."""
    interpreter = backend.make_interpreter(content, settings)
    inp = interpreter.get_input_details()
    out = interpreter.get_output_details()
    if len(inp) != 1 or len(out) != 1:
        raise ModelError(f"model has {len(inp)} inputs and {len(out)} outputs; expected 1 and 1")
    return {
        "input_shape": [int(d) for d in inp[0]["shape"][1:]],
        "input_dtype": np.dtype(inp[0]["dtype"]).name,
        "output_shape": [int(d) for d in out[0]["shape"][1:]],
        "output_dtype": np.dtype(out[0]["dtype"]).name,
    }
