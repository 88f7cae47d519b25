"""jobs.metanet_key: the PruningNet fingerprint of a job's spec, for reuse between jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # jobs queued before this revision keep NULL: they never lend their PruningNet
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("metanet_key", sa.String(64), nullable=True))
    op.create_index("ix_jobs_owner_metanet_key_status", "jobs",
                    ["owner", "metanet_key", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_metanet_key_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("metanet_key")
