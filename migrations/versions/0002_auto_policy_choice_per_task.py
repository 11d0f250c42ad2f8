"""auto policy choice per task

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 04:03:40.250348

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tuned', sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    # Not batch mode: rebuilding `tasks` on SQLite drops it, and with foreign keys on that deletes
    # every record (ON DELETE CASCADE). SQLite 3.35+ drops a column in place.
    op.drop_column('tasks', 'tuned')
