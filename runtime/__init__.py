"""The light runtime: numpy and one inference library (imported lazily), never torch."""

from .recommender import Recommender, RequestError

__all__ = ["Recommender", "RequestError"]
