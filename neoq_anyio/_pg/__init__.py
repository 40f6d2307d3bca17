"""AnyIO-native PostgreSQL plumbing: connections, pool, error translation.

psycopg 3's async API waits through asyncio only; this package is the small
layer that lets the rest of neoq_anyio speak psycopg on asyncio and trio.
"""
