"""The one error type the checkpoint code raises for problems a user can act on."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded as asked; the message says what to do."""


class NothingToResume(CheckpointError):
    """The run's state is gone from memory and from disk: no restart can change that, so the job
    stops at once instead of spending its restarts on the same verdict."""


class SaveFailed(CheckpointError):
    """A checkpoint could not be committed (after retries): the run stops, since a restart meets the
    same file system, and training on would pile up work that no disk holds."""


class PeerUnreachable(CheckpointError):
    """Keepers of different nodes cannot connect: a setup error no restart changes."""


class WorldIncomplete(RuntimeError):
    """Nodes whose keepers answer were left out of this world (they reached the rendezvous after it
    closed) and memory cannot rebuild the run without them: a restart of the round brings them in,
    so this is the one resume failure that asks for a restart rather than stopping."""


def join_problems(problems: list[str], *, limit: int = 50) -> str:
    """One problem per line, capped so a badly damaged checkpoint still gives a readable error."""
    shown = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(shown)
