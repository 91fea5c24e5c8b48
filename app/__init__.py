"""DM-FNet fusion service, by the processes a request crosses: ``http/`` (FastAPI app, middleware, uvicorn's
connection guards), ``engine/`` (batching, admission, the model's own process), ``pacs/`` (PACS client and DICOM
node); ``logs``, ``settings`` and ``cli`` (``dmfnet serve``) beside them."""
