"""compact exit features (a codec per task; each feature row says its encoding) and record edits

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 12:00:00

`tasks.edits` counts records deleted or relabelled (the heads' refit rule counts them). Rows stored
before are raw float16 (codec 0). The upgrade then learns the codec of every task that
has enough of them and encodes its rows (raee_server.stores.codec): from about 24 KB a record to
2,926 bytes. A downgrade cannot restore raw features from codes: it drops the coded rows (their
records keep everything else; `raee-admin backfill-features` computes them again).
"""
from datetime import UTC, datetime
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema, then encode the features of every task that has enough records."""
    op.create_table(
        'feature_codecs',
        sa.Column('task_id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_feature_codecs_task_id_tasks'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('task_id', name=op.f('pk_feature_codecs')),
    )
    with op.batch_alter_table('exit_features', schema=None) as batch_op:
        batch_op.add_column(sa.Column('codec', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('edits', sa.Integer(), server_default='0', nullable=False))
    bind = op.get_bind()
    for (task_id,) in bind.execute(sa.text("SELECT id FROM tasks")).all():
        _encode_task(bind, task_id)


# Plain SQL as of this revision (not the store's ORM classes, which follow the newest schema).
RAW_ROWS = sa.text(
    "SELECT f.record_id, f.exits, f.dim, f.data FROM exit_features f JOIN exit_records r ON r.id = f.record_id"
    " WHERE r.task_id = :task AND f.codec = 0 ORDER BY f.record_id LIMIT :n")


def _encode_task(bind: sa.Connection, task_id: int) -> None:
    import numpy as np

    from raee_server.stores.codec import CODED, LEARN_ROWS, learn_codec

    def raw(rows: Sequence[sa.Row]) -> np.ndarray:
        return np.stack([np.frombuffer(r.data, dtype=np.float16).reshape(r.exits, r.dim) for r in rows])

    sample = bind.execute(RAW_ROWS, {"task": task_id, "n": LEARN_ROWS}).all()
    if len(sample) < LEARN_ROWS:
        return  # too few records to learn from: raw until the task grows (the store learns it then)
    codec = learn_codec(raw(sample))
    bind.execute(sa.text("INSERT INTO feature_codecs (task_id, created_at, data) VALUES (:task, :at, :data)"),
                 {"task": task_id, "at": datetime.now(UTC), "data": codec.to_bytes()})
    while rows := bind.execute(RAW_ROWS, {"task": task_id, "n": 500}).all():
        bind.execute(sa.text("UPDATE exit_features SET data = :data, codec = :codec WHERE record_id = :id"),
                     [{"id": r.record_id, "data": data, "codec": CODED} for r, data in zip(rows, codec.encode(raw(rows)))])


def downgrade() -> None:
    """Downgrade schema: coded rows cannot become raw again, so they go."""
    op.execute("DELETE FROM exit_features WHERE codec <> 0")
    # Plain ALTER TABLE DROP COLUMN (SQLite 3.35+), not batch mode: batch mode rebuilds a SQLite table
    # by dropping it, and dropping `tasks` with foreign keys on deletes every record (ON DELETE CASCADE).
    op.drop_column('tasks', 'edits')
    op.drop_column('exit_features', 'codec')
    op.drop_table('feature_codecs')
