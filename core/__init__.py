"""What the API and the workers share, web-free: settings (:mod:`~fimntk.core.config`), logs,
the server's error hierarchy (:mod:`~fimntk.core.errors`), the queue's names and handle
(:mod:`~fimntk.core.queue`), safetensors headers, named datasets and durable storage (blobs,
job records, artifacts: :mod:`~fimntk.core.storage`).

May import: :mod:`fimntk.contract`, pydantic(-settings), SQLAlchemy, Alembic, Redis, RQ, boto3.
Never: FastAPI or Starlette (the web layer, :mod:`fimntk.service`), torch or the engine
(:mod:`fimntk.worker` computes), the client.
"""
