"""``/v1/archs`` and ``/v1/datasets``: what a job spec may name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.auth import Owner
from app.deps import SettingsDep
from app.schemas import ArchList, DatasetList, errors

router = APIRouter(prefix="/v1", tags=["catalog"], responses=errors(401))


@router.get("/archs", response_model=ArchList, summary="Available architectures")
def archs(_owner: Owner, include_test: Annotated[bool, Query(
        description="include the tiny test_* architectures")] = False) -> ArchList:
    from pruning.registry import list_archs

    return ArchList(archs=list_archs(include_test=include_test))


@router.get("/datasets", response_model=DatasetList, summary="Available datasets")
def datasets(_owner: Owner, settings: SettingsDep) -> DatasetList:
    """The datasets a job may name here: `imagefolder` reads a folder, so only a server with
    dataset roots (`METAPRUNE_DATASET_ROOTS`) offers it."""
    from pruning.spec import list_datasets

    return DatasetList(datasets=[d for d in list_datasets()
                                 if d != "imagefolder" or settings.dataset_roots])
