"""Speed: what the benchmark suites under bench/ record (telemetry: FLOPs of a step, device peaks, peak
memory, NVML readings) and the report made of their JSON (``advface bench-report``). Not the paper's
evaluation, which is advface_engine.evaluation (``advface eval``)."""
