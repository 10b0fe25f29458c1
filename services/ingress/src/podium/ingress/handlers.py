"""The ingress's HTTP routes: each provider's module, one metrics wrapper, JSON errors.

Every route authenticates → parses → makes one event → stores it, in its
provider's module: :mod:`~podium.ingress.api` (bearer tokens),
:mod:`~podium.ingress.twilio` (signatures; SMS, keywords, status callbacks),
:mod:`~podium.ingress.sendgrid` (signed or basic-auth Inbound Parse). Download
links (:mod:`~podium.ingress.files`) serve artifacts. What they share is in
:mod:`~podium.ingress.base`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from podium.ingress.api import ApiRoutes
from podium.ingress.base import Deps, Handler, HttpError, error_response
from podium.ingress.files import FileRoutes
from podium.ingress.sendgrid import SendGridRoutes
from podium.ingress.twilio import TwilioRoutes

__all__ = ["Deps", "Handlers", "HttpError"]

log = logging.getLogger(__name__)


async def _not_found(request: web.Request) -> web.Response:
    return error_response(404, "not_found", "Not Found")


def _method_not_allowed(allowed: str) -> Handler:
    async def refuse(request: web.Request) -> web.Response:
        response = error_response(405, "method_not_allowed", "Method Not Allowed")
        response.headers["Allow"] = allowed
        return response

    return refuse


class Handlers:
    """Every provider's routes, each wrapped once for metrics and the error shape."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.providers = (
            ApiRoutes(deps),
            TwilioRoutes(deps),
            SendGridRoutes(deps),
            FileRoutes(deps),
        )

    def routes(self) -> list[web.RouteDef]:
        """The route table; unknown paths and methods answer in the JSON error shape too.

        Routes, not a middleware: a middleware adds two coroutine layers to every
        request, a measurable share of a webhook's CPU (docs/performance.md).
        """
        routes = []
        for provider in self.providers:
            for method, path, name, handler in provider.routes():
                routes.append(web.route(method, path, self._wrap(name, handler)))
                # Any other method on the same path (the same resource): 405 with Allow.
                allowed = "GET, HEAD" if method == "GET" else method
                routes.append(web.route("*", path, _method_not_allowed(allowed)))
        routes.append(web.route("*", "/{path:.*}", _not_found))
        return routes

    def _wrap(self, route: str, handler: Handler) -> Handler:
        metrics = self.deps.metrics
        # Labelled children looked up once: this is every request's path.
        latency = metrics.latency.labels(route)
        by_status: dict[int, Any] = {}

        async def wrapped(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except HttpError as err:
                metrics.refused.labels(route, err.code).inc()
                log.info(
                    "request refused",
                    extra={"route": route, "status": err.status, "code": err.code},
                )
                response = error_response(err.status, err.code, err.message)
                if err.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="podium"'
            except BaseException:
                latency.observe(time.perf_counter() - started)
                raise
            counter = by_status.get(response.status)
            if counter is None:
                counter = by_status[response.status] = metrics.requests.labels(
                    route, str(response.status)
                )
            counter.inc()
            latency.observe(time.perf_counter() - started)
            return response

        return wrapped
