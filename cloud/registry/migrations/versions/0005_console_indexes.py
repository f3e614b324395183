"""console indexes: the fleet pages filter, sort and page devices, commands, decisions, samples,
dead letters and triggers in SQL

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (index, table, columns): the same ``Index`` entries as cloud/registry/models.py.
INDEXES = (
    ("ix_devices_state", "devices", ["state"]),
    ("ix_devices_edge_id", "devices", ["edge_id"]),
    ("ix_devices_last_seen", "devices", ["last_seen"]),
    ("ix_samples_device_id_ts", "samples", ["device_id", "ts"]),
    ("ix_commands_device_id_issued_at", "commands", ["device_id", "issued_at"]),
    ("ix_decisions_device_id_ts", "decisions", ["device_id", "ts"]),
    ("ix_decisions_ts", "decisions", ["ts"]),
    ("ix_dead_letters_source_ts", "dead_letters", ["source", "ts"]),
    ("ix_dead_letters_ts", "dead_letters", ["ts"]),
    ("ix_triggers_ts", "triggers", ["ts"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
