"""Failing together: an error on one rank reaches every rank, named by rank and step.

Three pieces:
- `agree_on_errors(error, what)`: a collective after a phase where each rank may fail on its own (a save,
  a free-space check). Every rank learns every rank's error and raises the same `PeerFailure`, so none is
  left waiting in the next collective.
- `report_failure(message)`: a rank that raises writes one line into the process group's key-value store
  (torchrun's / the launcher's TCP store) before it dies.
- `FailureWatch`: a daemon thread on every rank that polls the store. When a peer reported a failure and
  this rank is still blocked (in a collective that will never complete), it logs the peer's message and
  ends the process after `grace_s`, well before the collective timeout. A rank that dies without a word
  (SIGKILL, a lost node) is caught by the collective timeout (`engine.collective_timeout_s`) instead.

`fail_together(where)` wraps a job body with all three; `describe_failure` turns whatever a blocked rank
caught into one message naming the rank that failed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator

import torch.distributed as dist

from scldm_scale.distributed.group import gather_object_all, get_rank, get_world_size

logger = logging.getLogger(__name__)

EXIT_PEER_FAILED = 3
"""Exit code of a rank ended by `FailureWatch` because a peer failed."""
_KEY = "scldm/failure/{rank}"


class PeerFailure(RuntimeError):
    """Raised on every rank when one or more ranks failed (the message names them)."""


def _store() -> dist.Store | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a group without a reachable store: nothing to report into
        return None


def agree_on_errors(error: BaseException | str | None, *, what: str) -> None:
    """Collective: raise `PeerFailure` on every rank if any rank passes an error.

    Args:
        error: this rank's exception (or message), None when this rank succeeded.
        what: the phase, for the message (e.g. "saving checkpoint step-00000040").

    Raises:
        PeerFailure: "<what> failed on rank 1: OSError: [Errno 28] No space left on device" (every rank).
    """
    mine = None if error is None else (error if isinstance(error, str) else f"{type(error).__name__}: {error}")
    everyone = gather_object_all(mine)
    failed = [(rank, msg) for rank, msg in enumerate(everyone) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)
        raise PeerFailure(f"{what} failed on {len(failed)} of {len(everyone)} ranks: {detail}")


def report_failure(message: str) -> None:
    """Record this rank's failure in the store, so blocked peers can name it (best effort, never raises)."""
    store = _store()
    if store is None or get_world_size() == 1:
        return
    try:
        store.set(_KEY.format(rank=get_rank()), message)
    except Exception:  # noqa: BLE001 - the store host may be the rank that died
        pass


def peer_failures() -> dict[int, str]:
    """Failures other ranks reported, by rank (empty when none or when the store is gone)."""
    store = _store()
    if store is None:
        return {}
    found = {}
    me = get_rank()
    for rank in range(get_world_size()):
        if rank == me:
            continue
        key = _KEY.format(rank=rank)
        try:
            if store.check([key]):
                found[rank] = store.get(key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - store unreachable: report nothing
            return found
    return found


def describe_failure(exc: BaseException, where: str) -> str:
    """One line for this rank's log and exception: what failed here, and which peer failed first."""
    peers = peer_failures()
    if peers:
        first = "; ".join(f"rank {r}: {m}" for r, m in sorted(peers.items()))
        return f"rank {get_rank()} stopped {where} because a peer failed ({first})"
    if _looks_like_peer_loss(exc):
        return (
            f"rank {get_rank()} stopped {where}: a collective failed ({type(exc).__name__}: {exc}); no rank "
            "reported an error, so a rank died without a word (killed, out of memory, node lost) or hangs"
        )
    return f"rank {get_rank()} failed {where}: {type(exc).__name__}: {exc}"


def _looks_like_peer_loss(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, dist.DistBackendError) or any(
        s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "gloo")
    )


class FailureWatch:
    """Daemon thread: ends this process `grace_s` after a peer reports a failure, unless it ends first.

    Args:
        grace_s: how long a rank may take to notice the failure itself (its collective errors out and
            `finally` blocks run) before the watch ends it with `EXIT_PEER_FAILED`.
        poll_s: store polling interval.
    """

    def __init__(self, grace_s: float = 10.0, poll_s: float = 1.0) -> None:
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FailureWatch:
        if get_world_size() > 1 and _store() is not None:
            self._thread = threading.Thread(target=self._run, name="scldm-failure-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """The body finished or is unwinding on its own: stand down."""
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(self.poll_s):
            peers = peer_failures()
            if not peers:
                continue
            first = "; ".join(f"rank {r}: {m}" for r, m in sorted(peers.items()))
            logger.error("rank %d: a peer failed (%s); exiting in %.0f s unless this rank stops first", get_rank(), first, self.grace_s)
            if self._done.wait(self.grace_s):
                return
            logger.error("rank %d: still blocked %.0f s after a peer failed; exiting with code %d", get_rank(), self.grace_s, EXIT_PEER_FAILED)
            logging.shutdown()
            os._exit(EXIT_PEER_FAILED)


@contextlib.contextmanager
def fail_together(
    where: Callable[[], str], *, grace_s: float = 10.0, agreed: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Run a job body so that a failure on any rank ends every rank promptly, with one clear message.

    Args:
        where: called on failure for the position, e.g. `lambda: f"at step {trainer.step + 1}"`.
        grace_s: see `FailureWatch`.
        agreed: exception types that every rank raises together (configuration errors checked on every
            rank): passed through unchanged, not reported.

    Raises:
        PeerFailure: this rank was stopped by another rank's failure (the message names it);
        the original exception otherwise (after reporting it to the peers).
    """
    watch = FailureWatch(grace_s=grace_s).start()
    try:
        yield
    except (PeerFailure, *agreed):
        watch.stop()
        raise  # every rank already agreed on this failure
    except BaseException as exc:
        watch.stop()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        message = describe_failure(exc, where())
        logger.error("%s", message)
        if peer_failures():
            raise PeerFailure(message) from exc
        report_failure(message)  # first to fail, or first to notice a silent death: tell the others
        if _looks_like_peer_loss(exc):
            raise PeerFailure(message) from exc
        raise
    finally:
        watch.stop()
