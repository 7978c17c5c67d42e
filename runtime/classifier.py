"""Classify event recordings with an exported tmkt ONNX model, in one piece or as a stream.

The model's own metadata (`tmkt.export.metadata`) says how raw events become frames (T, sensor
size, binning, input size), so a caller hands over events and gets a class:

    clf = EventClassifier("model.onnx")           # provider "auto": CUDA if it works, else CPU
    p = clf.predict(rec.events)                   # Prediction(label, index, score, ...)
    for p in clf.stream(chunks): ...              # stream-mode model, membranes carried on

`predict` bins the whole recording into T frames, as training did with each sample.
Int8 models (`tmkt export --int8`) take the same frames (they binarize them as the Loihi export
does) and keep int32 membranes, which the metadata names; nothing else differs for a caller.
`stream` treats each chunk of events as one window: the chunk is binned into
`frames_per_chunk` frames (default T) the same way, and the frames are fed step by step to
the single-step model. With `carry_state=True` (default) the LIF membranes run on from one
chunk to the next as on a live sensor; the first chunk starts from rest. With
`carry_state=False` every chunk is classified on its own (then it equals `predict` on that
chunk, and an unrolled model works too). Each chunk's prediction is the softmax of the mean of
its step logits.

Input that binning cannot show the network is reported with Python `warnings` (`InputWarning`):
events outside the model's sensor, which binning drops (once per `predict`, once per `stream`
with the totals over its chunks), and an empty recording given to `predict`, whose prediction
reflects the network's biases only. The CLI prints them; a library user sees them as any warning.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


from tmkt.data.binning import MAX_WINDOWS
from tmkt.errors import TmktError

PROVIDERS = ("auto", "cuda", "cpu")


class InferenceError(TmktError, RuntimeError):
    """The model cannot run as asked (wrong mode, provider not available, bad input)."""


class InputWarning(UserWarning):
    """Events the model cannot see as given (outside its sensor, or none at all)."""


def events_outside_sensor(events: np.ndarray, spec) -> int:
    """How many of `events` binning drops for lying outside `spec.sensor_size`, after the shift
    to the origin where the spec bins that way (the rule of `tmkt.data.spec.frames_from_events`)."""
    if len(events) == 0:
        return 0
    x, y = events["x"].astype(np.int64), events["y"].astype(np.int64)
    if spec.binning.get("shift_to_origin", False):
        x, y = x - x.min(), y - y.min()
    return int(((x < 0) | (x >= spec.sensor_size[0]) | (y < 0) | (y >= spec.sensor_size[1])).sum())


@dataclass(frozen=True)
class Prediction:
    """One classified recording or window.

    label: class name; index: class index; score: its softmax probability;
    probabilities: `[K]` softmax of the mean step logits; logits: `[K]` mean step logits;
    latency_ms: events in -> prediction out (binning + onnxruntime), wall clock;
    events: number of events classified; t_range_us: (first, last) timestamp or None if empty.
    """

    label: str
    index: int
    score: float
    probabilities: np.ndarray
    logits: np.ndarray
    latency_ms: float
    events: int
    t_range_us: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "score": self.score,
            "probabilities": [float(v) for v in self.probabilities],
            "latency_ms": self.latency_ms,
            "events": self.events,
            "t_range_us": None if self.t_range_us is None else list(self.t_range_us),
        }


def make_session(model: str | os.PathLike | bytes, provider: str = "auto", threads: int | None = None):
    """An onnxruntime session on `provider` ("auto" | "cuda" | "cpu") and the provider that runs.

    `threads`: onnxruntime's intra-op thread count (None: its default, one per core).

    "auto" tries CUDA and falls back to the CPU quietly (onnxruntime-gpu without a usable GPU
    logs loader errors at severity 1-3; they are muted while trying). "cuda" raises
    InferenceError when the CUDA provider cannot be created.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise InferenceError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    want_cuda = provider in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not want_cuda:
        raise InferenceError("the CUDA execution provider is not in this onnxruntime build (install onnxruntime-gpu)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    if want_cuda:
        ort.set_default_logger_severity(4)  # mute the loader's errors when there is no GPU
    try:
        sess = ort.InferenceSession(src, opts, providers=providers)
    finally:
        ort.set_default_logger_severity(2)
    ran = sess.get_providers()[0]
    if provider == "cuda" and ran != "CUDAExecutionProvider":
        raise InferenceError(
            "onnxruntime could not create the CUDA execution provider (no GPU, or the CUDA/cuDNN "
            "libraries it needs are missing); use --provider cpu or auto"
        )
    return sess, ran


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


class EventClassifier:
    """An exported tmkt ONNX model (unrolled or stream) with its binning (state: the session)."""

    def __init__(self, model_path: str | os.PathLike, provider: str = "auto", threads: int | None = None) -> None:
        from tmkt.export.metadata import data_spec
        from tmkt.runtime.model_check import check_model_file

        self.path = str(model_path)
        self.metadata = check_model_file(self.path)  # file, metadata and graph checked before onnxruntime
        self.spec = data_spec(self.metadata)
        self.mode: str = self.metadata["mode"]
        self.timesteps: int = int(self.metadata["timesteps"])
        self.class_names: list[str] = list(self.metadata["class_names"])
        self.states: list[dict[str, Any]] = list(self.metadata.get("states", []))
        self.session, self.provider = make_session(self.path, provider, threads)

    # -------------------------------------------------------------- frames and logits

    def frames(self, events: np.ndarray | list[np.ndarray], n_frames: int | None = None) -> np.ndarray:
        """Bin `[N]` structured events (or a list of time-ordered arrays, binned as their
        concatenation without building it) into `[n_frames or T, C, H, W]` float32 frames."""
        from dataclasses import replace

        from tmkt.data.spec import frames_from_events

        spec = self.spec if n_frames is None else replace(self.spec, timesteps=int(n_frames))
        try:
            return frames_from_events(events if isinstance(events, list) else np.asarray(events), spec)
        except TmktError:  # the binning's own named errors (timestamp range, frame size)
            raise
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise InferenceError(f"cannot bin these events: {e}") from None

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Membranes at rest, one `[B, *shape]` array per LIF layer (stream models), of the
        dtype the metadata names (float32; int32 in int8 models, `tmkt export --int8`)."""
        return {s["input"]: np.zeros((batch, *s["shape"]), np.dtype(s.get("dtype", "float32"))) for s in self.states}

    def step(self, frame: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step of a stream model: `frame` `[B, C, H, W]` -> (logits `[B, K]`, new state)."""
        if self.mode != "stream":
            raise InferenceError(f"{self.path}: step() needs a stream-mode model (tmkt export --mode stream)")
        res = self.session.run(None, {"frame": np.ascontiguousarray(frame, np.float32), **state})
        return res[0], {s["input"]: res[1 + k] for k, s in enumerate(self.states)}

    def logits(self, frames: np.ndarray) -> np.ndarray:
        """Step logits `[T, B, K]` of frames `[T, B, C, H, W]` (state starts at rest)."""
        frames = np.ascontiguousarray(frames, np.float32)
        if frames.ndim != 5:
            raise InferenceError(f"frames must be [T, B, C, H, W], got shape {frames.shape}")
        if self.mode == "unrolled":
            if frames.shape[0] != self.timesteps:
                raise InferenceError(f"{self.path}: the unrolled model takes T={self.timesteps} frames, got {frames.shape[0]}")
            return self.session.run(["step_logits"], {"events": frames})[0]
        state = self.zero_state(frames.shape[1])
        out = []
        for f in frames:
            lo, state = self.step(f, state)
            out.append(lo)
        return np.stack(out)

    def _prediction(self, mean_logits: np.ndarray, t0: float, events: np.ndarray | list[np.ndarray]) -> Prediction:
        probs = softmax(mean_logits.astype(np.float64))
        k = int(np.argmax(probs))
        pieces = [e for e in events if len(e)] if isinstance(events, list) else [events] if len(events) else []
        t_range = (int(pieces[0]["t"][0]), int(pieces[-1]["t"][-1])) if pieces else None
        return Prediction(
            label=self.class_names[k],
            index=k,
            score=float(probs[k]),
            probabilities=probs,
            logits=mean_logits,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            events=sum(len(e) for e in pieces),
            t_range_us=t_range,
        )

    # -------------------------------------------------------------- public API

    def _warn_outside(self, outside: int, total: int) -> None:
        if outside:
            w, h = self.spec.sensor_size[0], self.spec.sensor_size[1]
            warnings.warn(f"{outside:,} of {total:,} events lie outside the model's {w}x{h} sensor and are dropped",
                          InputWarning, stacklevel=3)

    def predict(self, events: np.ndarray) -> Prediction:
        """Classify one recording (`[N]` structured events with x, y, t µs, p); warns
        (`InputWarning`) about an empty recording and about events outside the sensor."""
        events = np.asarray(events)
        if len(events) == 0:
            warnings.warn("the recording holds no events; its prediction reflects the network's biases only",
                          InputWarning, stacklevel=2)
        self._warn_outside(events_outside_sensor(events, self.spec), len(events))
        t0 = time.perf_counter()
        frames = self.frames(events)
        lo = self.logits(frames[:, None])[:, 0]
        return self._prediction(lo.mean(0), t0, np.asarray(events))

    def classify_window(
        self, events: np.ndarray | list[np.ndarray], state: dict[str, np.ndarray], frames_per_chunk: int | None = None
    ) -> tuple[Prediction, dict[str, np.ndarray]]:
        """One window of a live stream on a stream-mode model: bin `events` into `frames_per_chunk`
        (default T) frames, step them from `state` (`zero_state(1)` at the start) and return the
        prediction and the state to carry on. `stream(..., carry_state=True)` in one call.
        `events` may be a list of time-ordered arrays of one dtype (the packets of a live window),
        binned as their concatenation without building it."""
        if self.mode != "stream":
            raise InferenceError(f"{self.path}: live windows need a stream-mode model (tmkt export --mode stream)")
        t0 = time.perf_counter()
        events = events if isinstance(events, list) else np.asarray(events)
        steps = []
        for f in self.frames(events, int(frames_per_chunk or self.timesteps)):
            out, state = self.step(f[None], state)
            steps.append(out[0])
        return self._prediction(np.stack(steps).mean(0), t0, events), state

    def stream(
        self, chunks: Iterable[np.ndarray], *, carry_state: bool = True, frames_per_chunk: int | None = None
    ) -> Iterator[Prediction]:
        """One Prediction per chunk of events, as chunks arrive (see the module docstring)."""
        if carry_state and self.mode != "stream":
            raise InferenceError(
                f"{self.path}: streaming with carried state needs a stream-mode model "
                "(tmkt export --mode stream); or pass carry_state=False"
            )
        n = int(frames_per_chunk or self.timesteps)
        if self.mode == "unrolled" and n != self.timesteps:
            raise InferenceError(f"{self.path}: the unrolled model takes T={self.timesteps} frames per chunk, not {n}")
        state = self.zero_state(1) if self.mode == "stream" else {}
        outside = total = 0
        for chunk in chunks:
            t0 = time.perf_counter()
            chunk = np.asarray(chunk)
            outside, total = outside + events_outside_sensor(chunk, self.spec), total + len(chunk)
            frames = self.frames(chunk, n)
            if self.mode == "unrolled":
                lo = self.logits(frames[:, None])[:, 0]
            else:
                if not carry_state:
                    state = self.zero_state(1)
                steps = []
                for f in frames:
                    out, state = self.step(f[None], state)
                    steps.append(out[0])
                lo = np.stack(steps)
            yield self._prediction(lo.mean(0), t0, chunk)
        self._warn_outside(outside, total)


def split_windows(events: np.ndarray, window_us: int, *, max_windows: int | None = MAX_WINDOWS) -> list[np.ndarray]:
    """Consecutive windows `[t0 + k*w, t0 + (k+1)*w)` from the first event on, for time-sorted
    events; empty windows inside the recording are kept (a sensor that saw nothing).

    Raises WindowCountError, before anything is allocated, when the recording's span would give
    more than `max_windows` windows (None: no limit). Any integer timestamps (int64 or uint64, to
    their limits) are cut exactly."""
    from tmkt.data.binning import check_window_count, integer_times

    if window_us <= 0:
        raise InferenceError(f"window must be > 0 µs, got {window_us}")
    window_us = int(window_us)
    events = np.asarray(events)
    if len(events) == 0:
        return []
    t = integer_times(events["t"])
    first, last = int(t[0]), int(t[-1])
    if last < first:
        raise InferenceError("events are not time-sorted: windows need time-sorted events")
    n = check_window_count(first, last, window_us, max_windows)
    if n == 1:
        return [events]
    # edges first + k*w, k = 1..n-1, in uint64 (k*w <= last - first < 2**64, and the sum taken
    # modulo 2**64 is the edge itself for signed types, which lies within [first, last])
    edges = np.arange(1, n, dtype=np.uint64) * np.uint64(window_us) + np.uint64(first % 2**64)
    edges = (edges.view(np.int64) if t.dtype.kind == "i" else edges).astype(t.dtype)
    return np.split(events, np.searchsorted(t, edges, side="left"))
