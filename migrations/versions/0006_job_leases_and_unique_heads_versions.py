"""replicas: a lease per task on its background work, and heads versions unique per task

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 16:00:00

Several servers over one database take turns at a task's exit-head fit and `auto` tune through
`job_leases` (raee_server.stores.leases). A heads version number becomes unique per task: a unique
index, not a table rebuild. Versions written twice by two fits before this revision are numbered
again in the order they were stored, so the index can be built and the newest stays newest.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'job_leases',
        sa.Column('task_id', sa.Integer(), nullable=False),
        sa.Column('holder', sa.String(length=200), nullable=False),
        sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_job_leases_task_id_tasks'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('task_id', name=op.f('pk_job_leases')),
    )
    bind = op.get_bind()
    twice = bind.execute(sa.text(
        "SELECT DISTINCT task_id FROM task_heads GROUP BY task_id, version HAVING count(*) > 1")).all()
    for (task_id,) in twice:
        ids = bind.execute(sa.text("SELECT id FROM task_heads WHERE task_id = :t ORDER BY version, id"),
                           {"t": task_id}).scalars().all()
        for number, row_id in enumerate(ids, start=1):
            bind.execute(sa.text("UPDATE task_heads SET version = :v WHERE id = :i"), {"v": number, "i": row_id})
    op.create_index('uq_task_heads_version', 'task_heads', ['task_id', 'version'], unique=True)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('uq_task_heads_version', table_name='task_heads')
    op.drop_table('job_leases')
