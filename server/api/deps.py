"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

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


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    request.app.state.authenticator.check_admin(authorization)


def require_inference_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    request.app.state.authenticator.check_inference(authorization)


# Router-level dependencies. The upload route reads its body itself, so the admin check
# runs before a single upload byte reaches disk.
AdminDep = Depends(require_admin)
InferenceKeyDep = Depends(require_inference_key)
ServicesDep = Annotated[Services, Depends(get_services)]
ReadyServicesDep = Annotated[Services, Depends(get_ready_services)]
