"""``GET /images/{id}``: a stored image or its thumbnail, reached only by the ids the store holds."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi import Path as FastApiPath
from fastapi.responses import FileResponse, Response

from .catalog import THUMBNAIL_MAX
from .schema import error_responses
from .service import CatalogDep

router = APIRouter()


@router.head("/images/{image_id}", include_in_schema=False)
@router.get("/images/{image_id}", summary="a stored image, or its thumbnail", response_class=Response,
            responses={200: {"description": "the image file as stored (any of the formats embed reads), or a "
                                            "JPEG thumbnail", "content": {"image/*": {}}},
                       **error_responses(404, 422)})
def image(catalog: CatalogDep,
          image_id: str = FastApiPath(pattern=r"^[0-9]{1,18}$", description="the image's id: digits only"),
          size: int | None = Query(None, ge=16, le=THUMBNAIL_MAX, description="longer side of a JPEG thumbnail")):
    """Only images the store holds, by id; ``size`` gives a JPEG thumbnail instead of the file."""
    image_id = int(image_id)  # ASCII digits only: "+1", "1_0" and full-width digits are not ids
    cache = {"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"}
    if size is None:
        return FileResponse(catalog.image_file(image_id), headers=cache)
    return Response(catalog.thumbnail(image_id, size), media_type="image/jpeg", headers=cache)
