"""A step's scalars, each added with the way it combines over data-parallel ranks, reduced once.

Phases add what they measure on their rank; :meth:`StepMetrics.reduce` combines everything at the
end of the step with one all-reduce per reduction op (one SUM, one MAX) and returns the flat dict
the monitor logs. Every rank must add the same names in every step (local values excepted), so
that the reduced tensors line up.

The all-reduce is passed in (``tapo_ds.engine.all_reduce_`` in training; none in a single process).
``algorithms/`` and ``trajectory/`` do not import this module: their results write into one through
their own ``add_to(metrics)``.
"""

from __future__ import annotations

from typing import Callable

import torch

AllReduce = Callable[[torch.Tensor, str], torch.Tensor]


class StepMetrics:
    def __init__(self) -> None:
        self._means: dict[str, list[float]] = {}  # name -> [total, count]
        self._if_empty: dict[str, float | None] = {}
        self._sums: dict[str, float] = {}
        self._throughputs: dict[str, list[float]] = {}  # name -> [amount, local seconds]
        self._maxes: dict[str, float] = {}
        self._local: dict[str, float] = {}

    # ------------------------------------------------------------------ adding

    def mean(self, name: str, total: float, count: float, *, if_empty: float | None = 0.0) -> None:
        """Sum of ``total`` over ranks / sum of ``count`` over ranks; ``if_empty`` when the counts sum
        to 0 (None: the name is left out). Adding to the same name again pools both."""
        entry = self._means[name] = self._entry(self._means, name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)
        self._if_empty[name] = if_empty

    def sum(self, name: str, value: float) -> None:
        """Summed over ranks (and over the calls on this rank)."""
        self._sums[name] = self._entry(self._sums, name, 0.0) + float(value)

    def throughput(self, name: str, amount: float, seconds: float) -> None:
        """``amount`` summed over ranks per ``seconds`` of this rank (a throughput)."""
        amount += self._entry(self._throughputs, name, [0.0, 0.0])[0]
        self._throughputs[name] = [float(amount), float(seconds)]

    def max(self, name: str, value: float) -> None:
        """The largest over ranks."""
        self._maxes[name] = max(self._entry(self._maxes, name, float("-inf")), float(value))

    def local(self, name: str, value: float) -> None:
        """This rank's own value, not reduced (timings, the learning rate, a global norm)."""
        self._entry(self._local, name, None)
        self._local[name] = float(value)

    def update(self, other: "StepMetrics") -> None:
        """Take over another phase's metrics; a name belongs to one phase only."""
        clash = set(self.names()) & set(other.names())
        if clash:
            raise ValueError(f"metrics added twice in one step: {sorted(clash)}")
        self._means.update({k: list(v) for k, v in other._means.items()})
        self._if_empty.update(other._if_empty)
        self._sums.update(other._sums)
        self._throughputs.update({k: list(v) for k, v in other._throughputs.items()})
        self._maxes.update(other._maxes)
        self._local.update(other._local)

    def _entry(self, table: dict, name: str, default):
        for other in (self._means, self._sums, self._throughputs, self._maxes, self._local):
            if other is not table and name in other:
                raise ValueError(f"metric {name!r} added with two different reductions")
        return table.get(name, default)

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return [*self._means, *self._sums, *self._throughputs, *self._maxes, *self._local]

    def reduce(self, all_reduce: AllReduce | None = None, device=None) -> dict[str, float]:
        """The values over all ranks, as the monitor logs them. ``all_reduce(tensor, op)`` reduces in
        place (``op`` is "sum" or "max"); None: this process is the only rank."""
        means, sums, maxes = sorted(self._means), sorted(self._sums), sorted(self._maxes)
        rates = sorted(self._throughputs)
        summed = [x for k in means for x in self._means[k]] + [self._sums[k] for k in sums] \
            + [self._throughputs[k][0] for k in rates]
        summed = self._reduced(summed, "sum", all_reduce, device)
        largest = self._reduced([self._maxes[k] for k in maxes], "max", all_reduce, device)
        out: dict[str, float] = {}
        for i, k in enumerate(means):
            total, count = summed[2 * i], summed[2 * i + 1]
            if count > 0:
                out[k] = total / count
            elif self._if_empty[k] is not None:
                out[k] = self._if_empty[k]
        at = 2 * len(means)
        out.update(zip(sums, summed[at:at + len(sums)]))
        at += len(sums)
        out.update({k: a / max(self._throughputs[k][1], 1e-9) for k, a in zip(rates, summed[at:])})
        out.update(zip(maxes, largest))
        out.update(self._local)
        return out

    @staticmethod
    def _reduced(values: list[float], op: str, all_reduce: AllReduce | None, device) -> list[float]:
        if not values or all_reduce is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        return all_reduce(t, op).tolist()

    def __getitem__(self, name: str) -> float:
        """This rank's value of ``name`` before any reduction."""
        return self._local[name] if name in self._local else self.reduce()[name]

    def __repr__(self) -> str:
        return f"StepMetrics({self.reduce()})"
