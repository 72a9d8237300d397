"""A request's one transaction: its work is committed in one place, then what had to wait for the commit
(sending a job's task, publishing a job event) is done.

Polar's pattern: work that must follow the commit is buffered on the session while the request runs and
flushed only once the commit succeeded, so a rolled-back request sends nothing and a worker never gets a
job id whose row it cannot see yet.
"""

from collections.abc import Callable

from sqlalchemy.orm import Session

_AFTER_COMMIT = "percept.after_commit"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the session's work is committed; dropped with the session if it is rolled back."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def has_work(session: Session) -> bool:
    """Whether commit() has anything to do: a transaction begun (reads and writes alike), or actions waiting."""
    return session.in_transaction() or bool(session.info.get(_AFTER_COMMIT))


def commit(session: Session) -> None:
    """Commit, then run the buffered actions in order. Every action runs; the first error is raised after.

    The request's session dependency calls this when the route returns; a route that must see its work
    committed before it answers (a job-creating POST with `Prefer: wait`) calls it earlier, and the
    dependency's own call then has nothing left to do.
    """
    session.commit()
    actions: list[Callable[[], None]] = session.info.pop(_AFTER_COMMIT, [])
    failure: Exception | None = None
    for action in actions:
        try:
            action()
        except Exception as exc:  # the others still run: each was promised once the commit succeeded
            failure = failure or exc
    if failure is not None:
        raise failure
