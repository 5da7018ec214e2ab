"""One router per resource: blobs, jobs (with results), users, health."""
