"""The shapes an artifact must have for its SID layout and limits: the graph names and their tensors
with dynamic ranges, the table names, and the largest buffer a runtime allocates. The export builds its
graphs from ``expected_graphs`` and the loader checks every manifest against it (runtime/manifest.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .encoding import SidLayout
from .strict import array, integer, string, typed

DTYPE_BYTES = {"int64": 8, "uint64": 8, "float32": 4}


def graph_names(levels: int) -> list[str]:
    return ["backbone"] + [f"head_{i}" for i in range(levels)]


def table_names(levels: int) -> list[str]:
    return ["item_ids", "item_codes", "sid_keys", "sid_offsets", "sid_items"] + [
        f"valid_prefixes_{i}" for i in range(levels)]


@dataclass(frozen=True)
class Limits:
    """The largest request the artifact serves and the model's hidden width H."""

    max_history: int
    max_batch: int
    max_beam: int
    hidden_size: int

    @classmethod
    def from_json(cls, value, path: str = "limits") -> "Limits":
        return typed(cls, value, path, **{f.name: lambda v, p: integer(v, p, 1) for f in fields(cls)})

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple                        # ints and named dynamic dims

    @classmethod
    def from_json(cls, value, path: str) -> "Tensor":
        dim = lambda v, p: v if isinstance(v, str) and v else integer(v, p, 1)
        return typed(cls, value, path, name=string, dtype=lambda v, p: string(v, p, tuple(DTYPE_BYTES)),
                     shape=lambda v, p: tuple(dim(d, f"{p}[{i}]") for i, d in enumerate(array(v, p))))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def token_range(levels: int, max_history: int) -> tuple[int, int]:
    """[min, max] prompt length T: one history item + placeholders .. max_history items + placeholders."""
    return (2 * levels, (max_history + 1) * levels)


def expected_graphs(layout: SidLayout, limits: Limits) -> dict[str, tuple[tuple, tuple, dict]]:
    """The graphs every artifact of this layout and these limits has: name -> (inputs, outputs, dynamic).
    The export builds its graphs from this, and the loader checks the manifest against it."""
    L, H = layout.levels, limits.hidden_size
    graphs = {"backbone": (
        (Tensor("input_ids", "int64", ("batch", "tokens")), Tensor("attention_mask", "int64", ("batch", "tokens"))),
        (Tensor("hidden", "float32", ("batch", L + 1, H)),),
        {"batch": (1, limits.max_batch), "tokens": token_range(L, limits.max_history)})}
    beams = (1, limits.max_batch * limits.max_beam)
    for level, codes in enumerate(layout.codes):
        if level == 0:
            inputs, dynamic = (Tensor("root", "float32", ("beams", H)),), {"beams": beams}
        else:
            inputs = (Tensor("parent_state", "float32", ("parents", H)), Tensor("parent", "int64", ("beams",)),
                      Tensor("code", "int64", ("beams",)))
            dynamic = {"beams": beams, "parents": beams}
        state = (Tensor("state", "float32", ("beams", H)),) if 0 < level < L - 1 else ()
        graphs[f"head_{level}"] = (inputs + (Tensor("hidden", "float32", ("beams", H)),),
                                   (Tensor("log_probs", "float32", ("beams", codes)),) + state, dynamic)
    return graphs


def largest_tensor(layout: SidLayout, limits: Limits) -> tuple[str, int]:
    """('graph.tensor', bytes) of the largest buffer a runtime allocates for these limits."""
    sizes = []
    for name, (inputs, outputs, dynamic) in expected_graphs(layout, limits).items():
        for t in inputs + outputs:
            size = DTYPE_BYTES[t.dtype]
            for d in t.shape:
                size *= dynamic[d][1] if isinstance(d, str) else d
            sizes.append((f"{name}.{t.name}", size))
    return max(sizes, key=lambda x: x[1])
