"""initial schema: tasks, ingest batches, exit records, per-layer results

Revision ID: 0001
Revises: 
Create Date: 2026-11-30 03:51:17.051519

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('template', sa.Text(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('backbone_id', sa.String(length=200), nullable=False),
    sa.Column('encoder_id', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('name', name=op.f('uq_tasks_name'))
    )
    op.create_table('ingest_batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('added', sa.Integer(), nullable=False),
    sa.Column('present', sa.Integer(), nullable=False),
    sa.Column('rejected', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_ingest_batches_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ingest_batches'))
    )
    with op.batch_alter_table('ingest_batches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ingest_batches_task_id'), ['task_id'], unique=False)

    op.create_table('exit_records',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('text_hash', sa.String(length=64), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['ingest_batches.id'], name=op.f('fk_exit_records_batch_id_ingest_batches'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_exit_records_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_exit_records')),
    sa.UniqueConstraint('task_id', 'text_hash', name=op.f('uq_exit_records_task_id'))
    )
    with op.batch_alter_table('exit_records', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exit_records_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_exit_records_task_id'), ['task_id'], unique=False)

    op.create_table('layer_results',
    sa.Column('record_id', sa.String(length=36), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('predicted', sa.String(length=200), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('gold_probability', sa.Float(), nullable=False),
    sa.Column('correct', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['record_id'], ['exit_records.id'], name=op.f('fk_layer_results_record_id_exit_records'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('record_id', 'layer', name=op.f('pk_layer_results'))
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('layer_results')
    with op.batch_alter_table('exit_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_exit_records_task_id'))
        batch_op.drop_index(batch_op.f('ix_exit_records_status'))

    op.drop_table('exit_records')
    with op.batch_alter_table('ingest_batches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ingest_batches_task_id'))

    op.drop_table('ingest_batches')
    op.drop_table('tasks')
