"""A stage's MoE routing of one step as it crosses processes: kept by the coordinator in its plan history,
sent back with a replayed step so that the replay routes exactly as recorded."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

Routing = Iterable[tuple[int, torch.Tensor, torch.Tensor]]
"""(layer, ids_TK, weights_TK) of every MoE layer of a step, on the host (a ``RoutingRecord`` is one)."""


class RoutingRecord:
    """A stage's MoE routing of one step, stacked over its MoE layers: expert ids [R, T, K] (int16) and
    weights [R, T, K] (float32), numpy on the host. Iterating gives (layer, ids_TK, weights_TK) per layer.
    One array per kind, not per layer, and pickled as raw bytes: a record crosses a process boundary
    every step, and pickling numpy arrays (let alone small torch tensors) costs several times more."""

    __slots__ = ("layers", "ids", "weights")

    def __init__(self, layers: tuple[int, ...], ids_RTK: np.ndarray, weights_RTK: np.ndarray) -> None:
        self.layers, self.ids, self.weights = tuple(layers), ids_RTK, weights_RTK

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        return ((layer, self.ids[j], self.weights[j]) for j, layer in enumerate(self.layers))

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.weights.nbytes

    def __reduce__(self):
        return _record_from_bytes, (self.layers, self.ids.shape, self.ids.tobytes(), self.weights.tobytes())


def _record_from_bytes(layers: tuple[int, ...], shape: tuple[int, ...], ids: bytes, weights: bytes) -> RoutingRecord:
    """Unpickling: writable arrays (torch warns on tensors over read-only memory)."""
    return RoutingRecord(layers, np.frombuffer(bytearray(ids), dtype=np.int16).reshape(shape),
                         np.frombuffer(bytearray(weights), dtype=np.float32).reshape(shape))

EMPTY = RoutingRecord((), np.zeros((0, 0, 0), np.int16), np.zeros((0, 0, 0), np.float32))


def compact(routing: tuple[list[int], torch.Tensor | None], copy: bool = False) -> RoutingRecord:
    """The record of a step's routing as the runner has it (MoE layers, and [2, R, T, K] on the host:
    expert ids as float32, then weights): two conversions, whatever the number of layers; ``copy``: of its
    own (the tensor is a buffer used again)."""
    layers, r_2RTK = routing
    if r_2RTK is None:
        return EMPTY
    r = r_2RTK.numpy()  # numpy, not torch ops: a few microseconds, on the pipeline's chain at the last stage
    return RoutingRecord(tuple(layers), r[0].astype(np.int16), r[1].copy() if copy else r[1])
