"""The `percept` command: run the platform (embedded or one deployable at a time) and manage it.

It starts the gateway and the workers by name, as programs, the way the gateway sends tasks by name:
the core imports no service.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from percept.config import get_settings
from percept.infra import resolve_infra

app = typer.Typer(help="Percept: image-AI jobs behind one REST API.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
train_app = typer.Typer(help="Train models on your own data (through the API).", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()

DEV_TENANT = "dev"


def _logging() -> None:
    logging.basicConfig(level=get_settings().log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def migrate() -> None:
    """Apply database migrations (and seed the built-in models)."""
    from percept.db.migrate import upgrade

    _logging()
    infra = resolve_infra(get_settings())
    try:
        upgrade(infra.database_url)
        console.print("[green]database is at the latest migration[/]")
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
                forwarded_allow_ips=settings.trusted_proxies)


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


@app.command()
def run(workers: str = typer.Option("", help="Comma-separated worker pools to run (default: every declared one)")
        ) -> None:
    """Run the whole platform on this machine: embedded Postgres and Redis, local objects, gateway, workers."""
    from percept.db.migrate import upgrade
    from percept.db.session import session_scope
    from percept.db.tenants import create_key as make_key

    _logging()
    settings = get_settings()
    infra = resolve_infra(settings)
    children: list[subprocess.Popen] = []
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
        children.append(subprocess.Popen([sys.executable, "-m", "percept.cli", "gateway"], env=env))
        from percept.services import catalog

        for pool in [name.strip() for name in workers.split(",") if name.strip()] or list(catalog().worker_pools):
            children.append(subprocess.Popen([sys.executable, "-m", "workers", pool], env=env))
        url = f"http://{settings.host}:{settings.port}"
        console.print(f"\n[bold green]Percept is starting at {url}[/]  (API docs: {url}/docs)")
        console.print(f"dev API key: [bold]{key_file.read_text().strip()}[/]  (kept in {key_file})")
        console.print(f"data: {settings.data_dir}    Ctrl-C stops everything.\n")
        stop = {"now": False}
        for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a process manager
            signal.signal(signum, lambda *_: stop.update(now=True))
        while not stop["now"]:
            for child in children:
                if child.poll() is not None:
                    args = child.args if isinstance(child.args, list) else [child.args]
                    console.print(f"[red]{' '.join(map(str, args[-2:]))} exited ({child.returncode})[/]")
                    stop["now"] = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        infra.close()
        console.print("stopped.")


def _api_client(url: str | None, key: str | None):
    import httpx

    settings = get_settings()
    key_file = settings.data_dir / "dev-api-key"
    key = key or settings.api_key or (key_file.read_text().strip() if key_file.exists() else None)
    if not key:
        console.print("[red]No API key: pass --key, set PERCEPT_API_KEY, or run `percept run` once.[/]")
        raise typer.Exit(2)
    return httpx.Client(base_url=url or settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _checked(response) -> dict:
    if response.status_code >= 400:
        error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
        console.print(f"[red]{response.status_code} {error.get('code', '')}: {error.get('message', response.text)}[/]")
        raise typer.Exit(1)
    return response.json()


@train_app.command("classifier")
def train_classifier(
    dataset: Path = typer.Argument(..., exists=True, dir_okay=False, help="A zip with one folder per class"),
    name: str = typer.Option(..., help="Model name; each training adds a version"),
    balance: str = typer.Option("none", help="none | undersample | oversample | class_weight"),
    augment: bool = typer.Option(False, help="Flips, rotations, crops, colour jitter, noise"),
    epochs: int = typer.Option(30),
    val_fraction: float = typer.Option(0.2),
    target_precision: float = typer.Option(0.9, help="Precision the `unknown` threshold is chosen for"),
    seed: int = typer.Option(0),
    fine_tune: bool = typer.Option(False, help="Also fine-tune the backbone's last block"),
    url: str | None = typer.Option(None, help="API base URL (default PERCEPT_API_URL)"),
    key: str | None = typer.Option(None, help="API key (default PERCEPT_API_KEY, or the dev key)"),
) -> None:
    """Upload DATASET, train a classifier on it with a progress bar, then print its metrics."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    with _api_client(url, key) as client:
        with dataset.open("rb") as archive, console.status(f"uploading {dataset.name}"):
            uploaded = _checked(client.post("/v1/datasets", files={"file": (dataset.name, archive)}))
        with console.status("analysing the dataset (a job on the datasets queue)"):
            while uploaded["status"] == "analyzing":
                _checked(client.get(f"/v1/jobs/{uploaded['job_id']}", headers={"Prefer": "wait=5"}))
                uploaded = _checked(client.get(f"/v1/datasets/{uploaded['id']}"))
        if uploaded["status"] != "ready":
            error = uploaded.get("error") or {}
            console.print(f"[red]dataset refused: {error.get('code', '')}: {error.get('message', '')}[/]")
            raise typer.Exit(1)
        summary = uploaded["report"]
        counts = ", ".join(f"{label} {count}" for label, count in summary["classes"].items())
        console.print(f"dataset {uploaded['id']}: {summary['num_images']} images ({counts})")
        for warning in summary.get("warnings", []):
            console.print(f"[yellow]warning:[/] {warning}")
        job = _checked(client.post("/v1/train/classifier", json={
            "dataset": uploaded["id"], "name": name, "balance": balance, "augment": augment, "epochs": epochs,
            "val_fraction": val_fraction, "target_precision": target_precision, "seed": seed,
            "fine_tune": fine_tune}))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                      TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task(f"training {name}", total=epochs, stats="preparing features")
            while job["status"] in ("queued", "running"):
                job = _checked(client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=2"}))
                done = job["progress"]
                if done.get("phase") == "features":
                    progress.update(bar, stats=f"backbone features {done['done']}/{done['total']}")
                elif job["status"] == "running" and "loss" in done:
                    progress.update(bar, completed=done["done"], total=done["total"],
                                    stats=f"loss {done['loss']:.3f}  val_loss {done.get('val_loss', 0):.3f}  "
                                          f"val_acc {done.get('val_accuracy', 0):.2f}")
            progress.update(bar, completed=progress.tasks[0].total)
        if job["status"] != "succeeded":
            console.print(f"[red]training {job['status']}: {(job.get('error') or {}).get('message', '')}[/]")
            raise typer.Exit(1)
        metrics, model = job["output"]["metrics"], job["output"]["model"]
        table = Table(title=f"{model['name']} version {model['version']} (validation set)")
        for column in ("class", "precision", "recall", "F1", "support"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for label, row in metrics["per_class"].items():
            table.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                          str(row["support"]))
        console.print(table)
        console.print(f"macro F1 {metrics['macro_f1']:.3f}; unknown below {metrics['threshold']:.3f} "
                      f"(precision {metrics.get('precision_at_threshold', 0):.3f} at coverage "
                      f"{metrics.get('coverage', 0):.2f}, target {metrics['target_precision']})")


if __name__ == "__main__":
    app()

