"""Decode batches on one stage: many requests' one-position steps in one MLX call.

A request's KV cache lives either on its own (the per-layer caches of
:meth:`~mlx_relay.model.shard.Shard.make_cache`, which a prefill uses) or as one row of a
*batch group*: per layer one mlx-lm ``BatchKVCache`` (or ``BatchRotatingKVCache`` for
sliding-window layers), whose rows are left-padded to a common length and carry their own
RoPE offset and attention mask. A shard runs a group's caches like its own: inputs
``(B, 1[, H])``, one row per request.

Rows join and leave at any step. :meth:`BatchGroups.assemble` makes one group hold exactly
the requests of a call: the group that already holds most of them is the base; its other
rows split off into a group of their own (so requests that alternate between two calls, as
micro-batches do, keep two stable groups), rows of other groups move over, and requests
with their own caches are merged in. :meth:`BatchGroups.adopt` makes a group of new
requests whose prompts were prefilled together (left-padded, in caches from
:func:`empty_batch_caches`), :meth:`BatchGroups.take` gives a row its own caches back,
:meth:`BatchGroups.retain` drops the rows of requests that ended.

Exactness: a padded key contributes an exact zero to attention and rows never mix, so a
full-attention row gives bit for bit the logits of the same request alone. A
sliding-window row keeps the same keys as alone, but its ring buffer may be rotated
differently, so attention sums them in another order (differences in the last bits).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx


@dataclass(eq=False)
class _Group:
    rows: list[str]
    caches: list[Any] = field(default_factory=list)

    def subset(self, keep: Sequence[str]) -> list[Any]:
        """Per-layer caches holding only the rows ``keep`` (in that order); self unchanged."""
        index = mx.array([self.rows.index(rid) for rid in keep])
        out = []
        for cache in self.caches:
            part = copy.copy(cache)
            part.filter(index)
            out.append(part)
        return out

    def keep_only(self, keep: Sequence[str]) -> None:
        self.caches = self.subset(keep)
        self.rows = list(keep)
        # Evaluated now, so the old arrays (rows that left) are freed at once.
        mx.eval(cache_states(self.caches))

    def extend(self, rows: Sequence[str], caches: Sequence[Any]) -> None:
        for mine, theirs in zip(self.caches, caches, strict=True):
            mine.extend(theirs)
        self.rows.extend(rows)


def merge_caches(solo: Sequence[Sequence[Any]]) -> list[Any]:
    """One batched cache per layer from several requests' own caches (rows in order)."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*solo, strict=True)]


def empty_batch_caches(shard: Any, left_padding: Sequence[int]) -> list[Any]:
    """Empty batched caches for a shard's layers, for prompts left-padded by these amounts
    (one batched prefill of several new requests)."""
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, RotatingKVCache

    pads = list(left_padding)
    return [
        BatchRotatingKVCache(c.max_size, pads)
        if isinstance(c, RotatingKVCache)
        else BatchKVCache(pads)
        for c in shard.make_cache()
    ]


def cache_states(caches: Sequence[Any]) -> list[Any]:
    """The arrays of per-layer caches, to evaluate them at once."""
    return [c.state for c in caches if not c.empty()]


class BatchGroups:
    """The batch groups of one stage, keyed by request id (MLX thread only)."""

    def __init__(self) -> None:
        self._groups: list[_Group] = []
        self._group_of: dict[str, _Group] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._group_of

    def __len__(self) -> int:
        return len(self._group_of)

    @property
    def group_sizes(self) -> list[int]:
        return [len(g.rows) for g in self._groups]

    def assemble(self, request_ids: Sequence[str], solo: Mapping[str, list[Any]]) -> _Group:
        """A group holding exactly ``request_ids``.

        Args:
            request_ids: the requests of one batched step (distinct).
            solo: the own caches of each of them that is in no group yet; they are merged
                in, and the caller must drop its references to them.

        Returns:
            The group; its ``rows`` give the row order its inputs must follow.
        """
        wanted = set(request_ids)
        missing = [rid for rid in request_ids if rid not in self._group_of and rid not in solo]
        if missing:
            raise KeyError(f"no cache for {missing}")
        overlap: dict[int, int] = {}
        for rid in request_ids:
            group = self._group_of.get(rid)
            if group is not None:
                overlap[id(group)] = overlap.get(id(group), 0) + 1
        base: _Group | None = None
        if overlap:
            base = max(self._groups, key=lambda g: overlap.get(id(g), 0))
            leaving = [rid for rid in base.rows if rid not in wanted]
            if leaving:
                split = _Group(leaving, base.subset(leaving))
                mx.eval(cache_states(split.caches))
                self._add(split)
                base.keep_only([rid for rid in base.rows if rid in wanted])
        for group in list(self._groups):
            if group is base:
                continue
            moving = [rid for rid in group.rows if rid in wanted]
            if not moving:
                continue
            staying = [rid for rid in group.rows if rid not in wanted]
            moved = group.subset(moving)
            if staying:
                group.keep_only(staying)
            else:
                self._remove(group)
            base = self._join(base, moving, moved)
        joining = [rid for rid in request_ids if rid in solo and rid not in self._group_of]
        if joining:
            base = self._join(base, joining, merge_caches([solo[rid] for rid in joining]))
        assert base is not None and set(base.rows) == wanted
        return base

    def adopt(self, request_ids: Sequence[str], caches: list[Any]) -> _Group:
        """A new group of requests whose batched caches were just filled (a batched
        prefill); none of them may be in a group yet."""
        assert not any(rid in self._group_of for rid in request_ids)
        group = _Group(list(request_ids), caches)
        self._add(group)
        return group

    def take(self, request_id: str) -> list[Any]:
        """The request's row as its own per-layer caches (evaluated); it leaves its group."""
        group = self._group_of[request_id]
        row = group.rows.index(request_id)
        caches = [c.extract(row) for c in group.caches]
        mx.eval(cache_states(caches))
        staying = [rid for rid in group.rows if rid != request_id]
        del self._group_of[request_id]
        if staying:
            group.keep_only(staying)
        else:
            self._groups.remove(group)
        return caches

    def retain(self, live: Collection[str]) -> list[str]:
        """Drop the rows of requests not in ``live``; returns their ids."""
        dropped = [rid for rid in self._group_of if rid not in live]
        for group in list(self._groups):
            staying = [rid for rid in group.rows if rid in live]
            if len(staying) == len(group.rows):
                continue
            if staying:
                group.keep_only(staying)
            else:
                self._groups.remove(group)
        for rid in dropped:
            del self._group_of[rid]
        return dropped

    def discard(self, group: _Group) -> None:
        """Forget a group whose caches may be half-written (its step failed)."""
        if group in self._groups:
            self._remove(group)

    def clear(self) -> None:
        self._groups.clear()
        self._group_of.clear()

    def _join(self, base: _Group | None, rows: Sequence[str], caches: list[Any]) -> _Group:
        """``rows`` (held in ``caches``) join ``base``, or become the base if there is none."""
        if base is None:
            base = _Group(list(rows), caches)
            self._add(base)
        else:
            base.extend(rows, caches)
            self._claim(base, rows)
        return base

    def _add(self, group: _Group) -> None:
        self._groups.append(group)
        self._claim(group, group.rows)

    def _claim(self, group: _Group, rows: Sequence[str]) -> None:
        for rid in rows:
            self._group_of[rid] = group

    def _remove(self, group: _Group) -> None:
        self._groups.remove(group)
        for rid in group.rows:
            if self._group_of.get(rid) is group:
                del self._group_of[rid]
