"""``nezha.bench`` (folder bench/): the benchmark and latency-regression gate (``nezha bench``).

stats (percentiles, paired ratios, peak RSS, machine) -> contenders (floor, NEZHA runtime, torch reference,
AR baseline, HF generate) -> run (interleaved round-robin measurement) -> report (Markdown, PNG) and gate
(ratios against a stored baseline); suite composes them, cli is the thin command, gpu_check the prepared
CUDA run. The CI gate: instructions (instructions per request under callgrind, against
baseline-instructions.json) driving worker.py (a script: one loaded artifact, counted or served); ab times
the current tree against a git revision through two workers. Torch is imported only by the torch-side
contenders.
"""
