"""The try-it page at ``/``: one static HTML file (no build step, no external assets) that posts to ``/fuse``
like any client, and the built-in phantom samples it offers (synthetic, never patient data)."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from models.images.imaging import encode_png
from models.images.pair_input import MODALITIES
from models.images.phantoms import phantom_pair

PAGE = Path(__file__).with_name("static") / "tryit.html"
router = APIRouter(include_in_schema=False)  # a page for people, not part of the API contract


@router.get("/", response_class=HTMLResponse)
def page() -> HTMLResponse:
    """The try-it page."""
    return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-cache",
                                                   "Content-Security-Policy": "default-src 'self'; img-src 'self' "
                                                   "blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"})


@functools.cache
def _sample(modality: str) -> tuple[bytes, bytes]:
    mri, functional = phantom_pair(modality, 256, 256, seed=0)
    return encode_png(mri), encode_png(functional)


@router.get("/samples/{modality}/{role}.png")
def sample(modality: str, role: str) -> Response:
    """A built-in phantom image: ``modality`` ct/pet/spect, ``role`` mri/functional."""
    if modality not in MODALITIES or role not in ("mri", "functional"):
        return JSONResponse({"error": "not_found", "detail": f"no sample {modality}/{role}; modalities "
                             f"{', '.join(MODALITIES)}, roles mri, functional"}, 404)
    return Response(_sample(modality)[role == "functional"], media_type="image/png",
                    headers={"Cache-Control": "max-age=3600"})
