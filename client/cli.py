"""The ``fimntk`` command line.

Run the service: ``serve`` (everything on one machine), ``worker`` (one per GPU), ``demo``.
Use it: ``submit``, ``status``, ``wait``, ``result``, ``jobs``, ``cancel``; administer it:
``keys``. The server and key come from ``--url``/``--key``, ``FIMNTK_URL``/``FIMNTK_API_KEY``
or the config file (see :mod:`fimntk.client._config`). Commands that only read jobs need no torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fimntk.client._sync import Client
from fimntk.client.errors import ClientError, JobTimeoutError, NotFoundError, PermissionDeniedError
from fimntk.contract.vocabulary import METRICS, JobStatus

_DIGEST_FIELDS = "model.weights, model.probe, dataset.blob and operations[].v"


# -- running the service ----------------------------------------------------------------------


def _has_server_extra() -> bool:
    """Whether the server stack (``pip install "fimntk[server]"``) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "rq"))


def _add_server_commands(commands: Any) -> None:
    """``serve`` and ``worker``, from the server's packages when the server extra is there;
    otherwise commands of the same names that say how to install it."""
    if not _has_server_extra():
        for name in ("serve", "worker"):
            _command(
                commands,
                name,
                _needs_server_extra,
                f"{name} needs the server extra: pip install 'fimntk[server]'",
                "pip install 'fimntk[server]'",
            )
        return
    from fimntk.service import command as serve
    from fimntk.worker import command as worker

    for command in (serve, worker):
        command.add_arguments(
            _command(commands, command.NAME, command.run, command.HELP, command.EXAMPLE)
        )


def _needs_server_extra(args: argparse.Namespace) -> int:
    raise SystemExit(
        f"fimntk {args.command}: the server is not installed here; "
        "pip install 'fimntk[server]' on the machine that serves"
    )


def _demo(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir) if args.data_dir else None
    if args.dashboard:
        from fimntk.client.dashboard_demo import run_dashboard_demo

        return run_dashboard_demo(args.url, args.key, data_dir)
    from fimntk.client.demo import run_demo

    return run_demo(args.url, args.key, data_dir)


# -- using it ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.key, retries=args.retries)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _submit(args: argparse.Namespace) -> int:
    path = Path(args.spec)
    spec = _load_spec(path)
    with _client(args) as client:
        spec = _upload_files(client, spec, path.parent)
        job = client.submit(spec)
        if not args.wait:
            if args.json:
                _print_json(job)
            else:
                print(job["id"])
            return 0
        print(f"submitted {job['id']}", file=sys.stderr)
        job = _wait_job(client, job["id"], args.timeout, cancel=True)
        if job["status"] != JobStatus.SUCCEEDED:
            return _report_unfinished(job, args.json)
        _show_result(client.result(job["id"]), args.json)
    return 0


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit(
                "fimntk submit: YAML specs need PyYAML (pip install pyyaml), "
                "or write the spec as JSON"
            ) from None
        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        raise SystemExit(f"fimntk submit: {path} does not hold a JSON object")
    return spec


def _upload_files(client: Client, spec: dict[str, Any], base: Path) -> dict[str, Any]:
    """Upload the files named ``"@path"`` in the digest fields; put their digests there."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@"):
            file = (base / value[1:]).expanduser()
            if not file.is_file():
                raise SystemExit(f"fimntk submit: no file {file}")
            return client.upload(file)
        return value

    model = spec.get("model")
    if isinstance(model, dict):
        model["weights"] = resolve(model.get("weights"))
        if "probe" in model:
            model["probe"] = resolve(model["probe"])
    dataset = spec.get("dataset")
    if isinstance(dataset, dict) and "blob" in dataset:
        dataset["blob"] = resolve(dataset["blob"])
    for op in spec.get("operations") or []:
        if isinstance(op, dict) and "v" in op:
            op["v"] = resolve(op["v"])
    return spec


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.job_id is None:
            return _admin_overview(client, args.json)
        job = client.job(args.job_id)
    if args.json:
        _print_json(job)
        return 0
    _show_job(job)
    return 0


def _show_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    total = progress.get("total")
    done = f"{progress.get('done', 0)}/{total}" if total else str(progress.get("done", 0))
    rows = [
        ("id", job["id"]),
        ("status", job["status"]),
        ("metric", job["metric"]),
        ("representation", job.get("representation") or "-"),
        ("model", job["model"]),
        ("dataset", job["dataset"]),
        ("progress", f"{progress.get('stage', '-')} {done}"),
        ("created", _when(job.get("created_at"))),
        ("started", _when(job.get("started_at"))),
        ("finished", _when(job.get("finished_at"))),
        ("kept", "yes" if job.get("kept") else "no"),
    ]
    if job.get("reused_from"):
        rows.append(("reused from", job["reused_from"]))
    if job.get("timings"):
        rows.append(("timings", ", ".join(f"{k} {v:.2f}" for k, v in job["timings"].items())))
    if job.get("error"):
        rows.append(("error", _problem_line(job["error"])))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _problem_line(problem: dict[str, Any]) -> str:
    field = f" [field: {problem['field']}]" if problem.get("field") else ""
    return (
        f"{problem.get('title', 'Error')} ({problem.get('status')}): "
        f"{problem.get('detail', '')}{field}"
    )


def _admin_overview(client: Client, as_json: bool) -> int:
    try:
        status = client.admin_status()
    except NotFoundError:
        print(
            "this server has no admin overview (GET /v1/admin/status answered 404): it runs "
            "an older fimntk; give a job id ('fimntk status ID') or update the server",
            file=sys.stderr,
        )
        return 1
    except PermissionDeniedError:
        print(
            "'fimntk status' without an id is the admin overview and needs the admin key; "
            "for a job, give its id: 'fimntk status ID'",
            file=sys.stderr,
        )
        return 1
    if as_json:
        _print_json(status)
        return 0
    _show_overview(status)
    return 0


def _show_overview(status: dict[str, Any]) -> None:
    queue = status.get("queue") or {}
    if queue:
        reach = "reachable" if queue.get("reachable", True) else "UNREACHABLE"
        depth = queue.get("depth")
        print(f"queue {queue.get('name', '?')}: {reach}, {'?' if depth is None else depth} waiting")
        if queue.get("shards_in_flight") is not None:
            print(f"shards in flight: {queue['shards_in_flight']}")
    jobs = status.get("jobs")
    if isinstance(jobs, dict):
        print("jobs: " + "  ".join(f"{k} {v}" for k, v in jobs.items()))
    workers = status.get("workers")
    if isinstance(workers, list):
        print(f"\nworkers ({len(workers)}):")
        _table(
            [
                [
                    w.get("name"),
                    w.get("state"),
                    w.get("job_id") or "-",
                    w.get("device") or "-",
                    w.get("host") or "-",
                    _when(w.get("last_heartbeat")),
                    w.get("jobs_done", "-"),
                ]
                for w in workers
            ],
            ["NAME", "STATE", "JOB", "DEVICE", "HOST", "LAST HEARTBEAT", "DONE"],
        )
    failures = status.get("recent_failures")
    if failures == []:
        print("\nrecent failures: none")
    elif isinstance(failures, list):
        print(f"\nrecent failures ({len(failures)}):")
        _table(
            [
                [
                    f.get("id"),
                    f.get("owner"),
                    f.get("metric"),
                    f.get("representation") or "-",
                    f.get("worker") or "-",
                    _when(f.get("finished_at")),
                    _shorten(_problem_line(f["error"]) if f.get("error") else "-", 60),
                ]
                for f in failures
            ],
            ["ID", "OWNER", "METRIC", "REP", "WORKER", "FINISHED", "ERROR"],
        )
    known = {"queue", "jobs", "workers", "recent_failures"}
    for key, value in status.items():
        if key not in known:
            print(f"\n{key}: {json.dumps(value, default=str)}")


def _wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _wait_job(client, args.job_id, args.timeout, cancel=False)
    if args.json:
        _print_json(job)
    elif job["status"] == JobStatus.SUCCEEDED:
        print(f"{job['id']} succeeded")
    if job["status"] != JobStatus.SUCCEEDED:
        return _report_unfinished(job, args.json)
    return 0


def _wait_job(client: Client, job_id: str, timeout: float | None, cancel: bool) -> dict[str, Any]:
    try:
        return client.wait(job_id, timeout=timeout, cancel=cancel)
    except JobTimeoutError as exc:
        raise SystemExit(f"fimntk: {exc}") from None
    except KeyboardInterrupt:
        if cancel:
            raise SystemExit(f"interrupted: job {job_id} canceled") from None
        raise SystemExit(
            f"stopped waiting; job {job_id} goes on ('fimntk cancel {job_id}' cancels it)"
        ) from None


def _report_unfinished(job: dict[str, Any], as_json: bool) -> int:
    if not as_json:
        reason = _problem_line(job["error"]) if job.get("error") else job["status"]
        print(f"{job['id']} {job['status']}: {reason}", file=sys.stderr)
    return 1


def _result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.result(args.job_id)
        if args.out:
            _save_result(client, result, Path(args.out))
    _show_result(result, args.json, Path(args.out) if args.out else None)
    return 0


def _save_result(client: Client, result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for entry in result["operations"]:
        for value in entry["outputs"].values():
            if isinstance(value, dict) and "href" in value:
                client.download(value["href"], out / f"{value['name']}.safetensors")
    if result.get("representation_artifact"):
        client.download(result["representation_artifact"], out / "representation.safetensors")
    (out / "result.json").write_text(json.dumps(result, indent=2))


def _show_result(result: dict[str, Any], as_json: bool, out: Path | None = None) -> None:
    if as_json:
        _print_json(result)
        return
    for entry in result["operations"]:
        for name, value in entry["outputs"].items():
            if isinstance(value, dict):
                where = out / f"{value['name']}.safetensors" if out else value["href"]
                shown = f"tensor {value['dtype']} {value['shape']}  {where}"
            else:
                shown = str(value)
            print(f"[{entry['index']}] {entry['op']}.{name} = {shown}")
    if result.get("representation_artifact"):
        where = out / "representation.safetensors" if out else result["representation_artifact"]
        print(f"representation: {where}")
    if out:
        print(f"saved to {out}")


def _jobs(args: argparse.Namespace) -> int:
    items: list[dict[str, Any]] = []
    cursor = None
    with _client(args) as client:
        while True:
            page = client.jobs(
                status=args.status,
                metric=args.metric,
                representation=args.representation,
                model=args.model,
                dataset=args.dataset,
                created_after=args.since,
                created_before=args.until,
                limit=min(args.limit, 200),
                cursor=cursor,
            )
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor or (not args.all and len(items) >= args.limit):
                break
    if not args.all:
        items = items[: args.limit]
    if args.json:
        _print_json(items)
        return 0
    if not items:
        print("no jobs")
        return 0
    rows = []
    for job in items:
        progress = job.get("progress") or {}
        note = _problem_line(job["error"]) if job.get("error") else progress.get("stage", "")
        rows.append(
            [
                job["id"],
                job["status"],
                job["metric"],
                job.get("representation") or "-",
                _when(job.get("created_at")),
                _duration(job),
                _shorten(note, 50),
            ]
        )
    _table(rows, ["ID", "STATUS", "METRIC", "REP", "CREATED", "TIME", "STAGE / ERROR"])
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    if args.json:
        _print_json(job)
    elif job["status"] == JobStatus.CANCELED:
        print(f"{job['id']} canceled")
    else:
        print(
            f"{job['id']} stopping (was {job['status']}); 'fimntk wait {job['id']}' to see it end"
        )
    return 0


# -- administering it -------------------------------------------------------------------------


def _keys_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        user = client.create_user(args.name)
    if args.json:
        _print_json(user)
        return 0
    print(f"user {user['id']} ({user['name']})")
    print(f"api key: {user['api_key']}")
    print(
        "Shown once. Hand it over; its owner sets FIMNTK_API_KEY, or api_key in "
        "~/.config/fimntk/config.toml.",
        file=sys.stderr,
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        users = client.users()
    if args.json:
        _print_json(users)
        return 0
    _table(
        [
            [
                u["id"],
                u["name"],
                "admin" if u["is_admin"] else "",
                "revoked" if u["revoked"] else "active",
                _when(u.get("created_at")),
            ]
            for u in users
        ],
        ["ID", "NAME", "ROLE", "KEY", "CREATED"],
    )
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        user = client.revoke_user(args.user_id)
    if args.json:
        _print_json(user)
        return 0
    print(f"revoked the key of {user['id']} ({user['name']}); their jobs and results stay")
    return 0


# -- formatting -------------------------------------------------------------------------------


def _table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers, *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _when(value: Any) -> str:
    moment = _parse_time(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _duration(job: dict[str, Any]) -> str:
    start, end = _parse_time(job.get("started_at")), _parse_time(job.get("finished_at"))
    if start is None:
        return "-"
    seconds = ((end or datetime.now(start.tzinfo)) - start).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- the parser -------------------------------------------------------------------------------


def _command(
    commands: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
    example: str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        parents=list(parents),
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fimntk``."""
    parser = argparse.ArgumentParser(
        prog="fimntk",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="example:\n  fimntk serve                  # then, from a laptop:\n"
        "  FIMNTK_URL=http://gpu-box:8000 FIMNTK_API_KEY=fk_... fimntk jobs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--url", help="server URL (default: FIMNTK_URL, the config file, or http://127.0.0.1:8000)"
    )
    remote.add_argument("--key", help="API key (default: FIMNTK_API_KEY or the config file)")
    remote.add_argument(
        "--retries", type=int, default=4, help="tries after a connection error or 503 (default: 4)"
    )
    remote.add_argument("--json", action="store_true", help="print JSON instead of text")

    _add_server_commands(commands)

    demo = _command(
        commands,
        "demo",
        _demo,
        "run demo jobs end to end with the Python client",
        "fimntk demo --url http://gpu-box:8000 --key fk_...",
    )
    demo.add_argument("--url", help="server URL (default: start 'fimntk serve' locally)")
    demo.add_argument("--key", help="API key (default: FIMNTK_API_KEY or the local admin key)")
    demo.add_argument(
        "--data-dir",
        help="data directory of the local server, new or made by "
        "an earlier demo (default: ~/.cache/fimntk/demo)",
    )
    demo.add_argument(
        "--dashboard",
        action="store_true",
        help="fill the server with a small training run (digits, KFAC/EKFAC/diag per "
        "checkpoint) and print the dashboard's URL",
    )

    submit = _command(
        commands,
        "submit",
        _submit,
        f"submit a job spec (JSON or YAML, the body of POST /v1/jobs); in {_DIGEST_FIELDS} "
        "a value '@FILE' uploads FILE (relative to the spec) and puts its digest there",
        "fimntk submit job.yaml --wait      # job.yaml: model: {weights: '@model.safetensors', "
        "...}",
        [remote],
    )
    submit.add_argument("spec", metavar="SPEC", help="job spec, .json, .yaml or .yml")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job (Ctrl-C cancels it) and print its result",
    )
    submit.add_argument("--timeout", type=float, help="with --wait: give up after seconds")

    status = _command(
        commands,
        "status",
        _status,
        "a job's status; without an id, the admin overview (queue, workers, recent failures)",
        "fimntk status j_0123abcd...",
        [remote],
    )
    status.add_argument("job_id", metavar="ID", nargs="?", help="job id")

    wait = _command(
        commands,
        "wait",
        _wait,
        "wait for a job, with a progress bar on a terminal (Ctrl-C stops waiting, "
        "the job goes on); exit status 0 when it succeeded",
        "fimntk wait j_0123abcd... --timeout 600",
        [remote],
    )
    wait.add_argument("job_id", metavar="ID", help="job id")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds")

    result = _command(
        commands,
        "result",
        _result,
        "a succeeded job's outputs; --out DIR downloads its tensors (and kept "
        "representation) as safetensors",
        "fimntk result j_0123abcd... --out results/",
        [remote],
    )
    result.add_argument("job_id", metavar="ID", help="job id")
    result.add_argument("--out", metavar="DIR", help="download tensors and result.json here")

    jobs = _command(
        commands,
        "jobs",
        _jobs,
        "list jobs, newest first (the admin sees all)",
        "fimntk jobs --status failed --since 2025-01-01 --limit 20",
        [remote],
    )
    jobs.add_argument("--status", choices=[status.value for status in JobStatus])
    jobs.add_argument("--metric", choices=METRICS)
    jobs.add_argument("--representation", "--rep", dest="representation")
    jobs.add_argument("--model", help="weights digest")
    jobs.add_argument("--dataset", help="dataset digest or name")
    jobs.add_argument("--since", help="created at or after (ISO 8601)")
    jobs.add_argument("--until", help="created before (ISO 8601)")
    jobs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    jobs.add_argument("--all", action="store_true", help="every matching job")

    cancel = _command(
        commands,
        "cancel",
        _cancel,
        "cancel a queued or running job",
        "fimntk cancel j_0123abcd...",
        [remote],
    )
    cancel.add_argument("job_id", metavar="ID", help="job id")

    keys = _command(
        commands, "keys", lambda a: 0, "API keys (admin key needed)", "fimntk keys create alice"
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = _command(
        key_commands,
        "create",
        _keys_create,
        "create a user and print its API key (shown once)",
        "fimntk keys create alice",
        [remote],
    )
    create.add_argument("name", metavar="NAME", help="who the key is for")
    _command(
        key_commands,
        "list",
        _keys_list,
        "list users and whether their key works",
        "fimntk keys list",
        [remote],
    )
    revoke = _command(
        key_commands,
        "revoke",
        _keys_revoke,
        "revoke a user's key at once (their jobs and results stay)",
        "fimntk keys revoke u_0123abcd",
        [remote],
    )
    revoke.add_argument("user_id", metavar="USER_ID", help="user id (see 'fimntk keys list')")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fimntk``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ClientError as exc:
        print(f"fimntk {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
