"""Run what `tmkt.export` wrote: onnxruntime inference on recordings and streams (`classifier`),
netx files in lava-dl (`lava`) and on data sets with the bit-accurate simulator (`loihi_sim`),
and the spike / SynOp / energy profiler (`profiler`, `energy`, `profile_report`)."""

from tmkt.runtime.classifier import EventClassifier, Prediction  # noqa: F401
