"""Fault injection for tests: the run-config key ``inject-faults`` makes chosen clients misbehave.

TESTS ONLY. The value is empty (the default: nothing is injected) or a comma-separated list of
``<kind>:<partition-id>@<round>`` entries, ``<round>`` being a global round (1-based) or ``*`` for every
round. Kinds, applied by the ClientApp's train handler of that simulation partition:

- ``raise``: the client raises ``InjectedFault`` before training (the server sees an error reply);
- ``nan``: the client trains, then sets one value of its reply to NaN (server-side validation rejects it);
- ``stall``: the client sleeps ``min(round-timeout-s, 600)`` seconds before training (a round that stays
  in progress, e.g. to kill a run mid-round).

Example: ``inject-faults = "raise:1@2,nan:0@*"``. Deployment clients started without a partition id are
never matched (the local deployment mode passes one per SuperNode, so its tests can inject faults).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("raise", "nan", "stall")


class InjectedFault(RuntimeError):
    """The failure a client raises for an ``inject-faults`` ``raise`` entry."""


@dataclass(frozen=True)
class Fault:
    """One ``<kind>:<partition-id>@<round>`` entry (``round`` None = every round)."""

    kind: str
    partition_id: int
    round: int | None

    def matches(self, partition_id: int, server_round: int) -> bool:
        """Whether this entry applies to ``partition_id`` in global round ``server_round``."""
        return self.partition_id == partition_id and self.round in (None, server_round)


def parse_faults(text: str) -> list[Fault]:
    """Parse an ``inject-faults`` value; ``ValueError`` naming the bad entry."""
    faults = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        kind, sep, rest = entry.partition(":")
        pid, at, rnd = rest.partition("@")
        good_round = rnd == "*" or (rnd.isdigit() and int(rnd) > 0)
        if not (sep and at and kind in KINDS and pid.isdigit() and good_round):
            raise ValueError(
                f"has a bad entry {entry!r}: expected <kind>:<partition-id>@<round|*> with kind in "
                f"{', '.join(KINDS)}"
            )
        faults.append(Fault(kind, int(pid), None if rnd == "*" else int(rnd)))
    return faults


def faults_for(text: str, partition_id: int, server_round: int) -> set[str]:
    """The fault kinds that ``text`` injects for ``partition_id`` in ``server_round``."""
    if not text or partition_id < 0:
        return set()
    return {f.kind for f in parse_faults(text) if f.matches(partition_id, server_round)}
