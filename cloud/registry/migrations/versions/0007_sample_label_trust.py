"""samples.label_trusted: whether a sample's label may train models (a device's only from a trusted labeller)

Teacher and operator (``human``) labels already stored train as before; device labels already stored
become evaluation-only (nobody marked their devices trusted labellers when they arrived).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("label_trusted", sa.Boolean(), nullable=False, server_default=sa.false()))
    samples = sa.table(
        "samples", sa.column("label_source", sa.String()), sa.column("label_trusted", sa.Boolean())
    )
    op.execute(
        samples.update()
        .where(samples.c.label_source.in_(("teacher", "human", "operator")))
        .values(label_trusted=sa.true())
    )


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("label_trusted")
