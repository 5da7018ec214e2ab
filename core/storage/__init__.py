"""Durable storage: blobs (content-addressed files), records (a SQL database), artifacts.

Each store is an interface plus one local implementation; the production issue adds others
(PostgreSQL records need only a URL; object-store blobs and artifacts implement the same ABCs).
"""
