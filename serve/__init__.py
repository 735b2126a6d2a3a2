"""``nezha.serve`` (folder serve/): HTTP serving of NEZHA artifacts. ``nezha serve`` (Starlette on uvicorn, dynamic batching in worker
threads), the same routes on Ray Serve (``--engine ray``), and ``nezha loadtest``. Never imports torch."""

from .batching import Batcher, CostModel, measure_cost, plan_batch
from .model import LoadOptions, load_model
from .service import ServeOptions, Service

__all__ = ["Batcher", "CostModel", "LoadOptions", "ServeOptions", "Service", "load_model", "measure_cost",
           "plan_batch"]
