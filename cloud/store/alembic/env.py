"""Alembic environment of the fleet store.

The fleet store runs it on open with its own connection (`config.attributes["connection"]`), inside
the transaction that holds the migration lock. By hand it also works with a URL:
`alembic -x url=postgresql+psycopg://... upgrade head` (online) or `--sql` (offline, prints SQL).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from cloud.store.schema import metadata

config = context.config


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no database: pass -x url=... or set sqlalchemy.url")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,  # for `alembic revision --autogenerate` drafts
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    _run(given)
else:
    with sa.create_engine(_url(), poolclass=NullPool).begin() as connection:
        _run(connection)
