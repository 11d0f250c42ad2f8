"""task options: auto's objective and the label-prior correction

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 15:50:00

Label shares live in the existing `labels` JSON; the new `options` JSON holds the objective and
the prior-correction switch (NULL for tasks made before: the defaults apply).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('options', sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    # Not batch mode: rebuilding `tasks` on SQLite drops it, and with foreign keys on that deletes
    # every record (ON DELETE CASCADE). SQLite 3.35+ drops a column in place.
    op.drop_column('tasks', 'options')
