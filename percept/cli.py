"""The `percept` command: run the platform (embedded or one deployable at a time) and manage it.

It starts the gateway and the workers by name, as programs, the way the gateway sends tasks by name:
the core imports no service.
"""

import hashlib
import os
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from percept.config import get_settings
from percept.db.models import Priority
from percept.infra import Infra, resolve_infra

if TYPE_CHECKING:
    from percept.db.models import Job

app = typer.Typer(help="Percept: image-AI jobs behind one REST API.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
train_app = typer.Typer(help="Train models on your own data (through the API).", no_args_is_help=True)
app.add_typer(train_app, name="train")
models_app = typer.Typer(help="The model registry: list and show (through the API); import (for operators, straight "
                              "to the database and storage).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()

DEV_TENANT = "dev"
# `percept models import --kind`: the job kind (declared by the service that serves such models) that validates
# and registers the checkpoint, as POST /v1/models/import submits it.
IMPORT_JOB_KINDS = {"caption": "import_captioner", "text-to-image": "import_pipeline"}
# `percept models import store:PREFIX`: a checkpoint directory already in the platform's object storage.
STORE_PREFIX = "store:"
JOB_POLL_SECONDS = 0.5  # `percept models import` reads its job this often while it waits


def _logging() -> None:
    from percept.logs import configure_logging

    configure_logging(get_settings())


@app.command()
def migrate(check: bool = typer.Option(False, "--check", help="Change nothing: exit 0 if the schema is at the "
                                        "latest migration, 1 if not (what a pod's init container waits on)")) -> None:
    """Apply database migrations (and seed the built-in models)."""
    from percept.db.migrate import schema_is_current, upgrade

    _logging()
    infra = resolve_infra(get_settings())
    if check:
        try:
            ready, current, head = schema_is_current(infra.database_url)
        finally:
            infra.close()
        if not ready:
            console.print(f"[yellow]the database is at migration {current or 'none'}, not {head}: "
                          "`percept migrate` has not run for this release yet[/]", soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"[green]database is at migration {current} (this release needs {head})[/]")
        return
    try:
        upgrade(infra.database_url)
        console.print("[green]database is at the latest migration[/]")
    finally:
        infra.close()


@app.command("tenant-priority")
def tenant_priority(name: str = typer.Argument(..., help="Tenant name"),
                    priority: Priority = typer.Argument(..., help="high, normal or low")) -> None:
    """Set the priority tenant NAME's new jobs are queued at: a worker takes every waiting `high` job before any
    `normal` one, and every `normal` one before any `low` one."""
    from percept.db.session import session_scope
    from percept.db.tenants import set_priority

    infra = resolve_infra(get_settings())
    try:
        with session_scope(infra.database_url) as session:
            if not set_priority(session, name, priority):
                console.print(f"[red]no tenant named {name!r}; `percept keys create {name}` makes one[/]")
                raise typer.Exit(1)
            session.commit()
        console.print(f"tenant [bold]{name}[/]: new jobs queue at priority [bold]{priority.value}[/]")
    finally:
        infra.close()


@keys_app.command("create")
def create_key(name: str = typer.Argument(..., help="Tenant name; a new tenant is made if needed")) -> None:
    """Create an API key for tenant NAME and print it (once: only its hash is stored)."""
    from percept.db.session import session_scope
    from percept.db.tenants import create_key as make_key

    infra = resolve_infra(get_settings())
    try:
        with session_scope(infra.database_url) as session:
            tenant, key = make_key(session, name)
            session.commit()
        console.print(f"tenant [bold]{tenant.name}[/] ({tenant.id})", style="dim", highlight=False)
        print(key)
    finally:
        infra.close()


@app.command()
def gateway() -> None:
    """Run the HTTP gateway on $PORT."""
    import uvicorn

    settings = get_settings()
    _logging()
    # X-Forwarded-For is believed only from the proxies named in PERCEPT_TRUSTED_PROXIES (uvicorn's own
    # default trusts loopback, which would let any local client pick the address its wrong keys count on).
    uvicorn.run("services.gateway.app:create_app", factory=True, host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False,
                forwarded_allow_ips=settings.trusted_proxies,
                log_config=None)  # uvicorn's own lines go through the root handler _logging() made


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context, pool: str = typer.Argument(..., help="a declared worker pool: classifier, "
                                                          "classifier-train, facerec, ...")) -> None:
    """Run the Celery worker of one worker pool (extra options go to `celery worker`)."""
    os.execvp(sys.executable, [sys.executable, "-m", "workers", pool, *ctx.args])


@app.command()
def sweep() -> None:
    """Send again the jobs a crash left behind, once (the gateway also does this every few seconds)."""
    from percept.sweeper import sweep_once

    _logging()
    settings = get_settings()
    infra = resolve_infra(settings)
    try:
        console.print(sweep_once(settings, infra.database_url, infra.broker_url))
    finally:
        infra.close()


def _log_dir() -> Path:
    """Where `percept run` writes its processes' logs: <data dir>/logs/<process>.log."""
    return get_settings().data_dir / "logs"


def replica_threads(replicas: int, cores: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of one of `replicas` processes of a pool: they share the machine's cores, so each one's
    model runs on cores / replicas threads (OMP_NUM_THREADS, which torch and onnxruntime read), not on every core
    (two processes of two threads each on two cores run several times slower than either alone). A pool run once,
    or an OMP_NUM_THREADS the user set, is left alone."""
    if replicas < 2 or "OMP_NUM_THREADS" in environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cores // replicas))}


@app.command()
def run(workers: str = typer.Option("", help="Comma-separated worker pools to run (default: every declared one; "
                                             "a pool named twice runs twice)")) -> None:
    """Run the whole platform on this machine: embedded Postgres and Redis, local objects, gateway, workers.

    A process that exits is started again (with back-off, logged, counted in /metrics): see percept/supervisor.py.
    """
    from percept.db.migrate import upgrade
    from percept.db.session import session_scope
    from percept.db.tenants import create_key as make_key
    from percept.supervisor import Child, StartupFailure, Supervisor, become_subreaper

    _logging()
    settings = get_settings()
    become_subreaper()  # before the embedded servers start: their orphans must be ours to reap
    with console.status("starting Postgres and Redis (embedded), applying migrations"):
        infra = resolve_infra(settings)
    supervisor: Supervisor | None = None
    try:
        upgrade(infra.database_url)
        key_file = settings.data_dir / "dev-api-key"
        if not key_file.exists():
            with session_scope(infra.database_url) as session:
                _, key = make_key(session, DEV_TENANT)
                session.commit()
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
        env = {**os.environ, "PERCEPT_DATABASE_URL": infra.database_url, "PERCEPT_BROKER_URL": infra.broker_url,
               "PERCEPT_STORAGE_URL": infra.storage_url, "PERCEPT_DATA_DIR": str(settings.data_dir)}
        from percept.services import catalog

        logs = _log_dir()
        pools = [name.strip() for name in workers.split(",") if name.strip()] or list(catalog().worker_pools)
        children = [Child("gateway", ["-m", "percept.cli", "gateway"], logs / "gateway.log")]
        for index, pool in enumerate(pools):
            name = f"worker-{pool}" if pools.count(pool) == 1 else f"worker-{pool}-{pools[:index].count(pool) + 1}"
            children.append(Child(name, ["-m", "workers", pool], logs / f"{name}.log",
                                  replica_threads(pools.count(pool), os.cpu_count() or 1, os.environ)))
        supervisor = Supervisor(infra, env, children, logs,
                                say=lambda line: console.print(line, style="yellow", markup=False, highlight=False,
                                                              soft_wrap=True))
        supervisor.start()
        url = f"http://{settings.host}:{settings.port}"
        console.print(f"\n[bold green]Percept[/] is starting at [bold]{url}[/]")
        console.print(f"  console   {url}/console/        API docs  {url}/docs")
        console.print(f"  dev key   [bold]{key_file.read_text().strip()}[/]  (kept in {key_file})")
        console.print(f"  workers   {', '.join(pools)}")
        console.print(f"  logs      {logs}/  (`percept logs` follows them; `percept logs gateway` one of them)")
        console.print(f"  data      {settings.data_dir}    Ctrl-C stops everything.\n")
        stop = {"now": False}
        for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a process manager
            signal.signal(signum, lambda *_: stop.update(now=True))
        while not stop["now"]:
            supervisor.check()  # restarts what exited
            time.sleep(0.5)
    except StartupFailure as failure:
        console.print(str(failure), style="red", markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor is not None:
            supervisor.stop()
        infra.close()
        console.print("stopped.")


@app.command()
def logs(service: str = typer.Argument(None, help="gateway, worker-classifier, ... (default: all of them)"),
         follow: bool = typer.Option(True, help="Keep printing what is written, as `tail -f` does"),
         lines: int = typer.Option(20, help="Lines of each log to print first")) -> None:
    """Print (and follow) the logs of `percept run`'s processes, under <data dir>/logs."""
    folder = _log_dir()
    found = sorted(folder.glob("*.log")) if folder.is_dir() else []
    chosen = [path for path in found if service is None or path.stem == service]
    if not chosen:
        names = ", ".join(path.stem for path in found) or "none yet: start the platform with `percept run`"
        console.print(f"[red]No log {service!r} in {folder} (logs: {names}).[/]" if service else
                      f"[red]No logs in {folder} ({names}).[/]")
        raise typer.Exit(2)
    from rich.text import Text

    def show(path: Path, line: str) -> None:  # the log's own text, never read as rich markup
        console.print(Text.assemble((f"{path.stem} ", "dim"), line) if len(chosen) > 1 else Text(line),
                      soft_wrap=True)

    positions = {}
    for path in chosen:
        text = path.read_text(errors="replace").splitlines()
        for line in text[-lines:] if lines > 0 else []:
            show(path, line)
        positions[path] = path.stat().st_size
    while follow:
        for path in chosen:
            size = path.stat().st_size
            if size < positions[path]:  # truncated or replaced: start again from its beginning
                positions[path] = 0
            if size > positions[path]:
                with path.open("rb") as log:
                    log.seek(positions[path])
                    chunk = log.read(size - positions[path]).decode(errors="replace")
                positions[path] = size
                for line in chunk.splitlines():
                    show(path, line)
        time.sleep(0.5)


def _checkpoint_zip(source: str, infra: Infra, scratch: Path) -> Path:
    """The checkpoint as a zip file: itself, the directory zipped into `scratch` (on disk, never whole in memory),
    or the objects under a `store:PREFIX` of the platform's object storage zipped there, one object at a time."""
    archive_path = scratch / "checkpoint.zip"
    if source.startswith(STORE_PREFIX):
        prefix = source.removeprefix(STORE_PREFIX).strip("/") + "/"
        keys = infra.store.list(prefix)
        if not keys:
            console.print(f"[red]No objects under {prefix!r} in the object storage: upload the checkpoint "
                          "directory's files there first.[/]")
            raise typer.Exit(2)
        with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
            for key in keys:
                archive.writestr(key.removeprefix(prefix), infra.store.get(key))
        return archive_path
    checkpoint = Path(source)
    if not checkpoint.exists():
        console.print(f"[red]{checkpoint} does not exist: pass a checkpoint directory, its zip, or "
                      f"{STORE_PREFIX}PREFIX for one in the object storage.[/]")
        raise typer.Exit(2)
    if checkpoint.is_file():
        if not zipfile.is_zipfile(checkpoint):
            console.print(f"[red]{checkpoint} is not a zip: pass the checkpoint directory or its zip.[/]")
            raise typer.Exit(2)
        return checkpoint
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(checkpoint).as_posix())
    return archive_path


def _submitted_import(infra: Infra, tenant: str, name: str, model_kind: str, job_kind: str,
                      archive_path: Path) -> "Job":
    """Store the zip under its content address, record the job for the tenant and send it; returns the job."""
    from percept.db import jobs as job_repo
    from percept.db import registry
    from percept.db.session import session_scope
    from percept.db.tenants import tenant_named
    from percept.errors import DependencyUnavailable
    from percept.queue import send_job
    from percept.services import catalog
    from percept.storage import import_key_for

    # 1. The bytes, where the gateway's upload of the same zip would be
    with archive_path.open("rb") as archive:
        sha256 = hashlib.file_digest(archive, "sha256").hexdigest()
        key, size = import_key_for(sha256), archive_path.stat().st_size
        if not infra.store.exists(key):
            archive.seek(0)
            infra.store.put_file(key, archive, size, content_type="application/zip")
    # 2. The job row, committed before it is sent
    with session_scope(infra.database_url) as session:
        tenant_id = tenant_named(session, tenant).id
        if registry.is_builtin_name(session, name):
            console.print(f"[red]{name!r} is a built-in model; choose another name.[/]")
            raise typer.Exit(1)
        other_kinds = {m.kind for m in registry.model_versions(session, tenant_id, name)} - {model_kind}
        if other_kinds:
            console.print(f"[red]{tenant}'s model {name!r} is a {sorted(other_kinds)[0]} model; import the "
                          "checkpoint under another name.[/]")
            raise typer.Exit(1)
        job = job_repo.queued_job(tenant_id, job_kind, catalog().kind(job_kind).queue,
                                  {"name": name, "kind": model_kind}, [{"object_key": key, "sha256": sha256}])
        job_repo.add_job(session, job)
        session.commit()
    # 3. Sent; a broker that refuses it ends the job, so a late delivery cannot run it
    try:
        send_job(infra.broker_url, job_kind, job.id, job.priority)
    except DependencyUnavailable:
        with session_scope(infra.database_url) as session:
            job_repo.fail_unsent(session, job.id, "The job queue was unreachable; nothing was run.")
            session.commit()
        raise
    return job


def _finished_job(database_url: str, job: "Job", timeout: float) -> "Job | None":
    """The job once terminal, read from the database in a short session per look; None after `timeout` s."""
    from percept.db import jobs as job_repo
    from percept.db.models import JobStatus
    from percept.db.session import session_scope

    deadline = time.monotonic() + timeout
    with console.status(f"job {job.id} on the {job.queue} queue") as status:
        while time.monotonic() < deadline:
            with session_scope(database_url) as session:
                found = job_repo.get_job(session, job.tenant_id, job.id)
            assert found is not None  # job rows are never deleted
            job = found
            if JobStatus(job.status).is_terminal():
                return job
            stage = (job.progress or {}).get("stage")
            status.update(f"job {job.id}: {job.status}" + (f" ({stage})" if stage else ""))
            time.sleep(JOB_POLL_SECONDS)
    return None


@models_app.command("import")
def import_model(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory (what `save_pretrained` wrote), a zip of "
                                               "one, or store:PREFIX for a directory in the object storage"),
    name: str = typer.Option(..., help="Model name; each import adds a version"),
    tenant: str = typer.Option(..., help="The tenant the model is registered for (made if new)"),
    kind: str = typer.Option("caption", help="caption: a Hugging Face image-to-text checkpoint; text-to-image: a "
                                             "diffusers pipeline"),
    timeout: float = typer.Option(600, help="Seconds to wait for the validation job"),
) -> None:
    """Import a checkpoint for TENANT without an upload: store it, run the job that loads it in the serving
    service's worker, and print the registered name and version."""
    from percept.errors import PerceptError
    from percept.services import catalog

    job_kind = IMPORT_JOB_KINDS.get(kind)
    if job_kind is None or job_kind not in catalog().job_kinds:
        console.print(f"[red]No service of this deployment imports {kind!r} models (kinds: "
                      f"{', '.join(k for k, j in IMPORT_JOB_KINDS.items() if j in catalog().job_kinds)}).[/]")
        raise typer.Exit(2)
    settings = get_settings()
    infra = resolve_infra(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="percept-import-") as scratch:
            archive_path = _checkpoint_zip(checkpoint, infra, Path(scratch))
            cap, setting = ((settings.max_pipeline_import_bytes, "PERCEPT_MAX_PIPELINE_IMPORT_BYTES")
                            if kind == "text-to-image" else (settings.max_import_bytes, "PERCEPT_MAX_IMPORT_BYTES"))
            if archive_path.stat().st_size > cap:
                console.print(f"[red]The checkpoint zip is larger than {cap // 2**20} MB ({setting}).[/]")
                raise typer.Exit(1)
            job = _submitted_import(infra, tenant, name, kind, job_kind, archive_path)
        done = _finished_job(infra.database_url, job, timeout)
    except PerceptError as exc:
        console.print(f"[red]{exc.code}: {exc.message}[/]")
        raise typer.Exit(1) from None
    finally:
        infra.close()
    if done is None:
        console.print(f"[red]job {job.id} did not finish within {timeout:g} s; it goes on "
                      f"(GET /v1/jobs/{job.id} shows it).[/]")
        raise typer.Exit(1)
    if done.status != "succeeded":
        error = done.error or {}
        console.print(f"[red]import {done.status}: {error.get('code', '')}: {error.get('message', '')}[/]")
        raise typer.Exit(1)
    model = (done.output or {})["model"]
    console.print(f"tenant [bold]{tenant}[/]: registered [bold]{model['name']}[/] version "
                  f"[bold]{model['version']}[/] (job {done.id})", highlight=False)


# The API user's commands (classify, caption, faces, generate, grid, jobs, models list|show, train ...).
from percept.cli_api import register  # noqa: E402 - after the apps it adds commands to

register(app, train_app, models_app)


if __name__ == "__main__":
    app()

