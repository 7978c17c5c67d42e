"""Deploy a trained run: lower it to the deploy graph (`graph`), then one exporter per target,
each `export_<target>(graph, path, *, verify=True, ...) -> ExportReport` (`report`): ONNX
(`onnx`), Loihi netx HDF5 (`netx`, 8-bit via `quantize`, checked with the bit-accurate simulator
`netx_sim`) and NIR (`nir`). Imports run one way: this package never imports `tmkt.runtime`."""
