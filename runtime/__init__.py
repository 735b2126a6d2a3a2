"""``nezha.runtime`` (folder runtime/): the light runtime. NumPy and one inference library (imported
lazily), never torch. Import it as ``nezha.runtime`` after ``pip install -e .``: the folder name is not the
import name."""

from .contract import Recommender, RequestError

__all__ = ["Recommender", "RequestError"]
