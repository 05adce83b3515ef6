"""Persistent merges: `POST /v1/adapters/merge` stores a merge as a normal adapter version.

The merged folder is written as a plain PEFT adapter into the store's staging area and
published through the same path as an upload (validation, content hash, atomic publish),
so it lists, versions, rolls back, replicates and serves like any other adapter; its
manifest keeps the recipe (sources by content hash, weights, method, relative error).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from pydantic import ConfigDict, Field

from adapters.merge import MergeError, MergeSource, MergeSpec, merge_adapters, write_peft_dir
from server.api.adapters import _version_out
from server.api.deps import AdminDep, ReadyServicesDep
from server.api.schemas import MergeIn, WeightedAdapter
from server.errors import InvalidParameter, LimitExceeded

router = APIRouter(tags=["adapters"], dependencies=[AdminDep])


class PersistentMergeIn(MergeIn):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="Adapter name the result is stored under (a new version if it exists).")
    sources: list[WeightedAdapter] = Field(..., min_length=1, description="Adapters (name or name@version) "
                                           "and their weights.")


@router.post("/v1/adapters/merge", status_code=201)
async def merge_and_store(body: PersistentMergeIn, response: Response, services: ReadyServicesDep) -> dict:
    registry, settings = services.registry, services.settings
    if len(body.sources) > settings.max_merge_adapters:
        raise LimitExceeded(f"{len(body.sources)} sources; at most {settings.max_merge_adapters}", param="sources")
    bindings = [await registry.bind(s.name) for s in body.sources]
    spec = MergeSpec(**body.model_dump(include=set(MergeIn.model_fields)))
    sources = [MergeSource(b.package, s.weight) for b, s in zip(bindings, body.sources)]
    try:
        result = await asyncio.to_thread(merge_adapters, body.name, sources, spec)
    except MergeError as exc:
        raise InvalidParameter(str(exc), param="sources") from exc
    with registry.store.staging() as staging:
        await asyncio.to_thread(write_peft_dir, result.package, staging, registry.signature)
        version, created = await registry.publish(body.name, staging)
    if not created:
        response.status_code = 200  # the same recipe over the same sources: the same bytes
    return {**_version_out(registry, version), "current": True,
            "merge": version.manifest.extra.get("merge", result.recipe)}
