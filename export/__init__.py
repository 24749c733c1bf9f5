"""rmt_export: PyTorch RMT -> validated single-segment ONNX bundle (needs the export extra)."""
