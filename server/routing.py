"""Task routes: a task name -> one adapter or a weighted split, with an optional fallback.

Callers say *what* they want (`task: "sentiment"`); operators decide which adapter version
serves it. A route is plain data; choosing a target is a pure function of the route and
an optional sticky key, so every replica maps one key to the same side of a split.

Routes persist as one JSON document in the adapter store (`.routes.json`: a file in a
directory store, an object on object storage; the dot keeps it out of the adapter scan).
Every replica sharing the store converges by re-reading it when its stamp changes. A
routes file given at start (YAML or JSON, same shape) is applied then: its tasks overwrite
the stored ones.

File shape (also the body of `PUT /v1/routes/{task}`, without the task key):

    sentiment:
      targets: [{adapter: sentiment@3f2a9c1d0b7e, weight: 90}, {adapter: sentiment-v2, weight: 10}]
      fallback: base            # or an adapter name; omitted = no fallback
    sql: {adapter: sql-lora}    # shorthand for one target
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from adapters.package import NAME_PATTERN
from adapters.store import AdapterStore, StoreUnavailable

logger = logging.getLogger(__name__)

ROUTES_DOCUMENT = ".routes.json"
BASE_FALLBACK = "base"  # a fallback naming this serves the base model without an adapter
MAX_TARGETS = 16


class RouteInvalid(ValueError):
    """A route definition with problems; `problems` lists every one."""

    def __init__(self, task: str, problems: list[str]):
        self.task = task
        self.problems = problems
        super().__init__(f"route {task!r} is invalid: " + "; ".join(problems))


@dataclass(frozen=True)
class RouteTarget:
    adapter: str  # `name` (follows the current version) or `name@version` (pinned)
    weight: float = 1.0


@dataclass(frozen=True)
class Route:
    task: str
    targets: tuple[RouteTarget, ...]
    fallback: str | None = None  # an adapter ref, BASE_FALLBACK, or None = errors surface

    @classmethod
    def parse(cls, task: str, data: Any) -> "Route":
        """Checks everything and raises RouteInvalid once with every problem."""
        problems: list[str] = []
        if not NAME_PATTERN.fullmatch(task):
            problems.append(f"task name {task!r} must match {NAME_PATTERN.pattern}")
        if not isinstance(data, Mapping):
            raise RouteInvalid(task, problems + ["a route is a mapping with `adapter` or `targets`"])
        unknown = sorted(set(data) - {"adapter", "targets", "fallback"})
        if unknown:
            problems.append(f"unknown route keys: {', '.join(unknown)}")
        if ("adapter" in data) == ("targets" in data):
            problems.append("give exactly one of `adapter` or `targets`")
        raw = [{"adapter": data["adapter"]}] if "adapter" in data else data.get("targets")
        targets: list[RouteTarget] = []
        if not isinstance(raw, list) or not raw:
            problems.append("`targets` must be a non-empty list")
            raw = []
        if len(raw) > MAX_TARGETS:
            problems.append(f"at most {MAX_TARGETS} targets")
        for index, item in enumerate(raw):
            if not isinstance(item, Mapping) or set(item) - {"adapter", "weight"}:
                problems.append(f"targets[{index}] must be {{adapter, weight}}")
                continue
            ref, weight = item.get("adapter"), item.get("weight", 1.0)
            if not isinstance(ref, str) or not _valid_ref(ref):
                problems.append(f"targets[{index}].adapter {ref!r} is not an adapter name or name@version")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                problems.append(f"targets[{index}].weight {weight!r} must be a finite number >= 0")
                continue
            targets.append(RouteTarget(str(ref), float(weight)))
        if targets and not sum(t.weight for t in targets) > 0:
            problems.append("target weights sum to 0")
        fallback = data.get("fallback")
        if fallback is not None and (not isinstance(fallback, str) or
                                     (fallback != BASE_FALLBACK and not _valid_ref(fallback))):
            problems.append(f"fallback {fallback!r} must be an adapter name, name@version or {BASE_FALLBACK!r}")
        if problems:
            raise RouteInvalid(task, problems)
        return cls(task, tuple(targets), fallback)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"targets": [{"adapter": t.adapter, "weight": t.weight} for t in self.targets]}
        if self.fallback is not None:
            data["fallback"] = self.fallback
        return data

    def choose(self, key: str | None = None) -> RouteTarget:
        """Pick a target in proportion to the weights; the same key always picks the same one."""
        point = sticky_point(self.task, key) if key else random.random()
        total = sum(t.weight for t in self.targets)
        edge = 0.0
        for target in self.targets:
            edge += target.weight / total
            if point < edge and target.weight > 0:
                return target
        return next(t for t in reversed(self.targets) if t.weight > 0)  # point fell in float rounding


def _valid_ref(ref: str) -> bool:
    name, _, version = ref.partition("@")
    return bool(NAME_PATTERN.fullmatch(name)) and (not version or bool(NAME_PATTERN.fullmatch(version)))


def sticky_point(task: str, key: str) -> float:
    """A uniform point in [0, 1) from (task, key): sha256, not hash(), so it is the same in
    every process; the task is mixed in so one caller is not on the canary side of every route."""
    digest = hashlib.sha256(f"{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parse_routes(data: Any) -> dict[str, Route]:
    """A whole routes document (file or store) -> routes; every problem of every route at once."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise RouteInvalid("*", ["a routes document is a mapping of task -> route"])
    routes: dict[str, Route] = {}
    problems: list[str] = []
    for task, body in data.items():
        try:
            routes[str(task)] = Route.parse(str(task), body)
        except RouteInvalid as exc:
            problems += [f"{task}: {p}" for p in exc.problems]
    if problems:
        raise RouteInvalid("*", problems)
    return routes


def load_routes_file(path: Path) -> dict[str, Route]:
    """YAML or JSON (JSON is YAML); an empty file or `{}` is no routes."""
    import yaml

    return parse_routes(yaml.safe_load(path.read_text(encoding="utf-8")))


class RouteTable:
    """This process's view of the stored routes; reads never touch the store.

    `reload` (run by `watch` every store poll interval, in a worker thread) re-reads the
    document when its stamp changed, so a change made through any replica is seen here
    within that interval. Writes are the store's read-modify-write of the document (a lock
    on a directory store, compare-and-swap on object storage): two replicas changing
    different routes at once keep both changes.
    """

    def __init__(self, store: AdapterStore):
        self.store = store
        self._routes: dict[str, Route] = {}
        self._stamp: str | None = None

    def routes(self) -> dict[str, Route]:
        return self._routes

    def get(self, task: str) -> Route | None:
        return self._routes.get(task)

    def reload(self) -> None:
        """Blocking (store IO): call from a worker thread."""
        stamp = self.store.document_stamp(ROUTES_DOCUMENT)
        if stamp is not None and stamp == self._stamp:
            return
        document = self.store.read_document(ROUTES_DOCUMENT) if stamp is not None else None
        if document is None:
            self._routes, self._stamp = {}, None
            return
        try:
            self._routes = parse_routes(json.loads(document.text))
        except (ValueError, RouteInvalid):
            # Keep serving the last good routes; a hand edit gone wrong must not drop them all.
            logger.exception("stored routes %s are unreadable; keeping the previous ones", ROUTES_DOCUMENT)
        self._stamp = document.stamp

    async def watch(self, interval_s: float) -> None:
        """Reload forever; while the store is unreachable the last routes keep serving."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload)
            except StoreUnavailable as exc:
                logger.warning("stored routes not reloaded, retrying: %s", exc)
            except Exception:
                logger.exception("stored routes not reloaded; retrying")

    def put(self, route: Route) -> None:
        self._update(lambda routes: {**routes, route.task: route})

    def put_many(self, new: Mapping[str, Route]) -> None:
        self._update(lambda routes: {**routes, **new})

    def delete(self, task: str) -> bool:
        found = False

        def without(routes: dict[str, Route]) -> dict[str, Route]:
            nonlocal found
            found = task in routes
            return {k: v for k, v in routes.items() if k != task}

        self._update(without)
        return found

    def _update(self, change: Callable[[dict[str, Route]], dict[str, Route]]) -> None:
        """Blocking. `change` applies to the newest stored routes (it may run again when
        another writer got in first), or to the last good ones when the stored text is broken."""
        written: dict[str, Route] = {}

        def apply(text: str | None) -> str:
            nonlocal written
            try:
                stored = parse_routes(json.loads(text)) if text is not None else {}
            except (ValueError, RouteInvalid):
                stored = dict(self._routes)
            written = change(stored)
            return json.dumps({task: written[task].to_dict() for task in sorted(written)}, indent=2, sort_keys=True)

        self.store.update_document(ROUTES_DOCUMENT, apply)
        self._routes, self._stamp = written, None  # the next reload reads what the store holds
