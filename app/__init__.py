"""The metaprune job service: settings, database, job queue (REST routes come later).

Layering (DESIGN.md §7): routes → services → repositories; repositories hold the SQL, and
every state change of a job is one SQL statement (``app.queue``).
"""
