"""``/v1/configurations``: stored pruned configurations, by architecture, dataset and MACs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.auth import Owner
from app.deps import Db
from app.schemas import ConfigurationPage, errors
from app.services import configurations

router = APIRouter(prefix="/v1", tags=["configurations"], responses=errors(401))

MAX_MACS = 10**15


@router.get("/configurations", response_model=ConfigurationPage,
            summary="Stored pruned configurations", responses=errors(422))
def list_configurations(
        owner: Owner, db: Db,
        arch: Annotated[str | None, Query(max_length=64, description="only this architecture")
                        ] = None,
        dataset: Annotated[str | None, Query(max_length=64, description="only this dataset")
                           ] = None,
        min_macs: Annotated[int | None, Query(ge=0, le=MAX_MACS,
                                              description="MACs of the pruned network ≥")] = None,
        max_macs: Annotated[int | None, Query(ge=0, le=MAX_MACS,
                                              description="MACs of the pruned network ≤")] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> ConfigurationPage:
    """The MetaPruning configurations the caller's succeeded jobs found (candidate, widths,
    MACs, params, test accuracy), newest first, a page at a time."""
    items, total = configurations.list_configurations(
        db, owner, arch=arch, dataset=dataset, min_macs=min_macs, max_macs=max_macs,
        limit=limit, offset=offset)
    more = offset + len(items) < total
    return ConfigurationPage(items=items, total=total, limit=limit, offset=offset,
                             next_offset=offset + len(items) if more else None)
