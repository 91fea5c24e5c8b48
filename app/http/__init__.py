"""The HTTP layer: the FastAPI app and its routes (main, api, pair_flow, state, tryit + static/), the ASGI
middleware (auth, size limits, admission before the body), uvicorn's connection guards (server) and the drain on
SIGTERM (shutdown). Stands on app.engine; app.engine and app.pacs never import it."""
