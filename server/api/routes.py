"""Task routes over HTTP: list, read, set, delete (admin token).

Routes live in the adapter store (server/routing.py), so a change made here reaches every
replica sharing the store within `store_poll_interval_s`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body

from server.api.deps import AdminDep, ReadyServicesDep
from server.errors import AdapterNotFound, InvalidParameter
from server.registry import Registry, parse_ref
from server.routing import BASE_FALLBACK, Route, RouteInvalid

router = APIRouter(tags=["routes"], dependencies=[AdminDep])


def _route_out(route: Route, registry: Registry) -> dict[str, Any]:
    """The stored route plus what each target resolves to now (`null`: not registered)."""
    refs = [t.adapter for t in route.targets]
    if route.fallback not in (None, BASE_FALLBACK):
        refs.append(route.fallback)
    resolved = {}
    for ref in refs:
        name, version = parse_ref(ref)
        entry = registry.entries.get(name)
        current = version or (entry.current if entry else None)
        resolved[ref] = f"{name}@{current}" if entry and current in entry.versions else None
    return {"task": route.task, **route.to_dict(), "resolves_to": resolved}


@router.get("/v1/routes")
async def list_routes(services: ReadyServicesDep) -> dict:
    routes = services.routes.routes()
    return {"routes": [_route_out(routes[t], services.registry) for t in sorted(routes)]}


@router.get("/v1/routes/{task}")
async def get_route(task: str, services: ReadyServicesDep) -> dict:
    route = services.routes.get(task)
    if route is None:
        raise AdapterNotFound(f"no route for task {task!r}", param="task")
    return _route_out(route, services.registry)


@router.put("/v1/routes/{task}")
async def put_route(task: str, services: ReadyServicesDep, body: dict = Body(
    ..., examples=[{"targets": [{"adapter": "sentiment@3f2a9c1d0b7e", "weight": 90},
                                {"adapter": "sentiment-v2", "weight": 10}], "fallback": "base"}],
)) -> dict:
    """Create or replace. Targets need not be registered yet (a fallback covers them meanwhile)."""
    try:
        route = Route.parse(task, body)
    except RouteInvalid as exc:
        raise InvalidParameter(f"route {task!r} is invalid", details=exc.problems, param="body") from exc
    await asyncio.to_thread(services.routes.put, route)
    return _route_out(route, services.registry)


@router.delete("/v1/routes/{task}")
async def delete_route(task: str, services: ReadyServicesDep) -> dict:
    if not await asyncio.to_thread(services.routes.delete, task):
        raise AdapterNotFound(f"no route for task {task!r}", param="task")
    return {"deleted": task}
