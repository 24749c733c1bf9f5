"""rmt_runtime: runs an exported RMT bundle segment by segment; needs numpy and one backend, never torch."""
