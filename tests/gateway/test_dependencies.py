"""Every dependency of every route is async: FastAPI runs a plain `def` dependency on a worker thread, one trip
(and thread wake-up) per request each, which the hot path cannot afford for what are attribute reads."""

import importlib
import inspect
import pkgutil

from fastapi.routing import APIRoute

from services.gateway import routers


def is_async(call: object) -> bool:
    """An async function or async generator, or an object whose __call__ is async (the security schemes)."""
    return (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
            or (not inspect.isfunction(call) and inspect.iscoroutinefunction(type(call).__call__)))


def test_no_route_has_a_dependency_that_runs_on_a_worker_thread():
    seen, on_threads = set(), set()

    def walk(dependant) -> None:
        for sub in dependant.dependencies:
            name = getattr(sub.call, "__qualname__", type(sub.call).__qualname__)
            seen.add(name)
            if not is_async(sub.call):
                on_threads.add(name)
            walk(sub)

    modules = [importlib.import_module(f"{routers.__name__}.{info.name}")
               for info in pkgutil.iter_modules(routers.__path__)]
    for module in modules:
        for route in module.router.routes:
            if isinstance(route, APIRoute):
                walk(route.dependant)
    assert {"get_infra", "get_events", "get_session", "get_tenant_id", "HTTPBearer"} <= seen
    assert on_threads == set()
