"""The PostgreSQL backend: workers, listener, schedulers, schema, and the SQL they run."""
