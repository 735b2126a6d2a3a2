"""``nezha.bench`` (folder bench/): the benchmark and latency-regression gate (``nezha bench``).

stats (percentiles, paired ratios, peak RSS, machine) -> contenders (floor, NEZHA runtime, torch reference,
AR baseline, HF generate) -> run (interleaved round-robin measurement) -> report (Markdown, PNG) and gate
(ratios against a stored baseline); suite composes them, cli is the thin command, gpu_check the prepared
CUDA run. Torch is imported only by the torch-side contenders.
"""
