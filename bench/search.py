"""Search latency over 100 000 stored jobs, on SQLite and PostgreSQL (a benchmark, not a test).

Fills a fresh record database with ``--jobs`` succeeded jobs of 10 users (3 labels and 5
scalars each, steps 0-9900), then times searches as one user (ownership applies) and as the
admin, each ``--repeats`` times, and prints p50 and p99 in milliseconds::

    python -m bench.search                          # SQLite in a temporary directory
    python -m bench.search --url postgresql://fimntk:fimntk@127.0.0.1:5432/fimntk_bench
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert, text

from fimntk.contract.filters import parse
from fimntk.core.storage.records import JOBS, LabelRow, ScalarRecordRow, SqlRecordStore, User
from fimntk.core.storage.search import ResultSearch

QUERIES = (
    "labels.run = 'seed3' AND rep IN ('kfac','ekfac') AND step >= 5000",
    "labels.experiment = 'exp7' AND scalars.trace > 50",
    "rep = 'kfac' AND status = 'succeeded'",
    "",
)
_REPS = ("kfac", "ekfac", "diag", "dense")
_BATCH = 5000


def fill(store: SqlRecordStore, n_jobs: int) -> None:
    """Insert ``n_jobs`` jobs with labels and scalars, in batches."""
    rng = random.Random(0)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    with store.engine.begin() as conn:
        for first in range(0, n_jobs, _BATCH):
            jobs, labels, scalars = [], [], []
            for i in range(first, min(first + _BATCH, n_jobs)):
                job_id = f"j_{i:032x}"
                jobs.append(
                    {
                        "id": job_id,
                        "owner_id": f"u_{i % 10}",
                        "status": "succeeded",
                        "spec": {},
                        "metric": "fim",
                        "representation": rng.choice(_REPS),
                        "model_digest": "sha256:" + "0" * 64,
                        "dataset": "digits",
                        "rep_key": "0" * 64,
                        "kept": False,
                        "cancel_requested": False,
                        "timings": {},
                        "created_at": start + timedelta(seconds=i),
                        "labels": {},
                        "step": 100 * rng.randrange(100),
                        "variant": "classif_logits",
                    }
                )
                run = ("experiment", f"exp{rng.randrange(50)}"), ("run", f"seed{rng.randrange(8)}")
                for key, value in run:
                    labels.append({"job_id": job_id, "key": key, "value": value})
                labels.append(
                    {"job_id": job_id, "key": "lr", "value": str(rng.choice((0.1, 0.01)))}
                )
                for key in ("trace", "lambda_max", "lambda_min", "effective_rank", "norm"):
                    scalars.append(
                        {"job_id": job_id, "key": key, "layer": None, "value": rng.random() * 100}
                    )
            conn.execute(insert(JOBS), jobs)
            conn.execute(insert(LabelRow.__table__), labels)
            conn.execute(insert(ScalarRecordRow.__table__), scalars)
        conn.execute(text("ANALYZE"))  # what autovacuum would have done by then


def time_queries(search: ResultSearch, user: User, repeats: int) -> None:
    """Print p50/p99 of each query (first page of 100)."""
    for query in QUERIES:
        clauses = parse(query)
        search.search(clauses, user, [], 100, None)  # warm
        times = []
        for _ in range(repeats):
            clock = time.perf_counter()
            rows, _ = search.search(clauses, user, [], 100, None)
            times.append(1000 * (time.perf_counter() - clock))
        times.sort()
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        print(
            f"| {user.name} | `{query or '(all)'}` | {len(rows)} | "
            f"{statistics.median(times):.1f} | {p99:.1f} |"
        )


def main() -> None:
    """Fill a database and time the searches."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: SQLite in a temporary directory)")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'records.db'}"
        store = SqlRecordStore(url)
        clock = time.perf_counter()
        fill(store, args.jobs)
        print(
            f"{store.engine.dialect.name}: {args.jobs} jobs in {time.perf_counter() - clock:.0f} s"
        )
        search = ResultSearch(store.engine)
        print("| user | filter | rows | p50 ms | p99 ms |\n|---|---|---|---|---|")
        time_queries(search, User("u_3", "user", False), args.repeats)
        time_queries(search, User("admin", "admin", True), args.repeats)
        store.close()


if __name__ == "__main__":
    main()
