"""``nezha.serve`` (folder serve/): HTTP serving of NEZHA artifacts. ``nezha serve`` (Starlette on uvicorn,
dynamic batching in worker threads), the same routes on Ray Serve (``--engine ray``), and ``nezha loadtest``.
Never imports torch.

errors (refusals and their statuses) -> protocol (strict parsing through the Recommender contract, KServe
v2 shapes) -> batching (the one decode path: LoadedModel, decode_items, the Batcher) -> model (loading) ->
service (routes, admission, deadlines, drain) -> app (Starlette + uvicorn, its connections bounded by
connections) or ray_engine (Ray Serve); pool and child (decode processes); admin (the admin API: its gate,
reload); binary (v2's binary tensors); metrics (Prometheus); loadtest; options (every option, declared once); cli is
the thin command.
Names are imported lazily so that ``nezha recommend`` does not pay for the server's imports."""

import importlib

_EXPORTS = {"Batcher": "batching", "plan_batch": "batching",
            "LoadOptions": "options", "load_model": "model", "ServeOptions": "options", "Service": "service",
            "ConnectionLimits": "options"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
