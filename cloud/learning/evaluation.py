"""Evaluation of ``.tflite`` artifacts with LiteRT (``ai_edge_litert``), the runtime the edge uses:
accuracy and macro-F1 on the held-out split, size and gzip size, latency at batch 1 and 64."""

from __future__ import annotations

import gzip
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LATENCY_WARMUP = 20
LATENCY_RUNS_B1 = 500
LATENCY_RUNS_B64 = 50
NUM_THREADS = 2


@dataclass
class Evaluation:
    """What ``evaluate_tflite`` measures of one artifact; stored as the model version's metrics."""

    size_bytes: int
    gzip_bytes: int
    accuracy: float
    macro_f1: float
    latency_us_b1: float
    throughput_b64: float
    confidence_mean: float
    input_dtype: str
    output_dtype: str

    def as_dict(self) -> dict[str, Any]:
        """The measurements as a plain dict."""
        return asdict(self)


def gzip_size(data: bytes) -> int:
    """Size of ``data`` gzipped at level 9: roughly what a download over a compressing link costs."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


class LiteRTModel:
    """One LiteRT interpreter over a flatbuffer; quantizes int8 inputs and dequantizes outputs."""

    def __init__(self, flatbuffer: bytes, *, num_threads: int = NUM_THREADS) -> None:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415  (LiteRT: not on every platform)

        self._interpreter = Interpreter(model_content=flatbuffer, num_threads=num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_shape = [int(d) for d in self._input["shape"][1:]]
        self.output_shape = [int(d) for d in self._output["shape"][1:]]
        self.input_dtype = np.dtype(self._input["dtype"]).name
        self.output_dtype = np.dtype(self._output["dtype"]).name
        self._batch = 1

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._output = self._interpreter.get_output_details()[0]
            self._batch = batch

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Inputs in the model's input type: float32, or quantized with its int8/uint8 scale and zero."""
        if self.input_dtype in ("int8", "uint8"):
            scale, zero = self._input["quantization"]
            info = np.iinfo(self.input_dtype)
            quantized: np.ndarray = np.clip(np.round(x / scale + zero), info.min, info.max).astype(
                self.input_dtype
            )
            return quantized
        return x.astype(np.float32)

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        """Outputs as float32, dequantized when the model outputs int8/uint8."""
        if self.output_dtype in ("int8", "uint8"):
            scale, zero = self._output["quantization"]
            dequantized: np.ndarray = (y.astype(np.float32) - zero) * scale
            return dequantized
        return y.astype(np.float32)

    def invoke_raw(self, x: np.ndarray) -> np.ndarray:
        """One invoke on a batch already in the input type; resizes the input tensor to the batch."""
        self._resize(len(x))
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        return np.asarray(self._interpreter.get_tensor(self._output["index"]))

    def predict(self, x: np.ndarray, *, batch: int = 64) -> np.ndarray:
        """Float32 outputs (probabilities) for float inputs, run ``batch`` rows at a time."""
        outputs = []
        for start in range(0, len(x), batch):
            chunk = self.quantize_input(x[start : start + batch])
            outputs.append(self.dequantize_output(self.invoke_raw(chunk)))
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.output_shape), np.float32)

    def latency_us(self, x: np.ndarray, *, runs: int) -> float:
        """Median wall time of one ``invoke`` on a pre-set input (what an edge pays per batch)."""
        self._resize(len(x))
        self._interpreter.set_tensor(self._input["index"], self.quantize_input(x))
        for _ in range(LATENCY_WARMUP):
            self._interpreter.invoke()
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter_ns()
            self._interpreter.invoke()
            times[i] = time.perf_counter_ns() - start
        return float(np.median(times)) / 1000.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """F1 averaged over all ``n_classes`` (a class never predicted scores 0)."""
    from sklearn.metrics import f1_score  # noqa: PLC0415  (scikit-learn: slow import, only to score)

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def evaluate_tflite(
    flatbuffer: bytes, x_test: np.ndarray, y_test: np.ndarray, *, n_classes: int
) -> Evaluation:
    """Quality on the held-out (normalized) inputs, size, and latency with the edge's runtime."""
    model = LiteRTModel(flatbuffer)
    probabilities = model.predict(x_test)
    predicted = probabilities.argmax(axis=1)
    accuracy = float(np.mean(predicted == y_test)) if len(y_test) else 0.0
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(x_test), size=64)
    latency_b1 = model.latency_us(x_test[pick[:1]], runs=LATENCY_RUNS_B1)
    latency_b64 = model.latency_us(x_test[pick], runs=LATENCY_RUNS_B64)
    return Evaluation(
        size_bytes=len(flatbuffer),
        gzip_bytes=gzip_size(flatbuffer),
        accuracy=accuracy,
        macro_f1=macro_f1(y_test, predicted, n_classes),
        latency_us_b1=latency_b1,
        throughput_b64=64 / (latency_b64 / 1e6) if latency_b64 > 0 else 0.0,
        confidence_mean=float(probabilities.max(axis=1).mean()) if len(probabilities) else 0.0,
        input_dtype=model.input_dtype,
        output_dtype=model.output_dtype,
    )
