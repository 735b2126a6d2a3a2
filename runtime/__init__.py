"""``nezha.runtime`` (folder runtime/): the light runtime. NumPy and one inference library (imported
lazily), never torch. Import it as ``nezha.runtime`` after ``pip install -e .``: the folder name is not the
import name."""

from .errors import InputError

from .contract import Recommender

__all__ = ["Recommender", "InputError"]
