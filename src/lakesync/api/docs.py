"""/docs: Swagger UI served from the files of the installed `fastapi-offline` package.

FastAPI's own /docs loads Swagger UI from a CDN, a blank page without internet. The page
here has no inline script (its start-up is /docs/init.js), so a strict CSP keeps working.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from lakesync.errors import ConfigError

router = APIRouter(include_in_schema=False)


def assets() -> Path:
    """The Swagger UI files (found without importing the package, which patches nothing)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("The fastapi-offline package is missing: pip install lakesync again.")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} · API docs</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/assets/favicon.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""

INIT = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""


@router.get("/docs")
def docs() -> HTMLResponse:
    return HTMLResponse(PAGE.format(title="lakesync"), headers={"Cache-Control": "no-cache"})


@router.get("/docs/init.js")
def docs_init() -> Response:
    return Response(INIT, media_type="text/javascript")


def install(app: FastAPI) -> None:
    """Serve /docs and its assets (create the app with docs_url=None)."""
    app.include_router(router)
    app.mount("/docs/assets", StaticFiles(directory=assets()), name="swagger-ui")
