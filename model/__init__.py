"""``nezha.model`` (folder model/): the PyTorch side (torch, transformers): the NEZHA model, checkpoints, the reference decoder (the
oracle), the AR baseline, the demo trainer and evaluation. The runtime never imports this package."""
