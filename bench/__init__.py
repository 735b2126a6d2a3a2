"""``nezha.bench`` (folder bench/): the benchmark and the regression gates (``nezha bench``; docs/bench.md).

stats -> contenders -> run (interleaved round-robin measurement) -> report (Markdown, PNG); gate is both
gates' one baseline/compare implementation and the ratio gate; suite composes a run, cli is the thin command.
The CI gate: instructions (under callgrind, against baseline-instructions.json) driving worker.py (a script:
one loaded artifact, counted or served, stages seen through the runtime's stage hook); ab times the current
tree against a git revision through two workers. Torch is imported only by the torch-side contenders.
"""
