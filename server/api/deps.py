"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.errors import NotReady
from server.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_ready_services(request: Request) -> Services:
    services: Services = request.app.state.services
    if not services.ready or services.inference is None:
        raise NotReady("the base model is still loading" if not services.draining else "server is shutting down",
                       headers={"Retry-After": "5"})
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
ReadyServicesDep = Annotated[Services, Depends(get_ready_services)]
