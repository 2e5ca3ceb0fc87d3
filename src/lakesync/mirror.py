"""Mirror mode: after a full copy, delete the documents whose records the lake no longer holds.

While the job copies, the key of every record it reads goes into a temporary collection,
``mirrorseen_<jobId>``. The keys of a batch are inserted before the batch's checkpoint is
committed, so the set survives a crash, and a replayed batch adds nothing new. After the
last batch the target collection is scanned in ``_id`` order, one page at a time. The ids
of a page that are not in the seen set are counted and committed in the checkpoint
(``mirrorPending``) first, then deleted: a crash in between deletes them again on resume
without counting them twice. Memory stays bounded by one batch or one page, on every
MongoDB-wire server (no ``$lookup``, no marker written on unchanged documents).

A mirror deletes every document its source does not hold, so its source must be the
operation's whole lake: `check_source` refuses any other (a part of the lake would delete
the rest), before the job is created and again before a run reads anything.

Only documents whose ``_id`` has the key's type (string or integer) are compared; others
were not written by this operation and are left alone. The runner refuses to delete when
the job rejected a record (its document may still be current) and when the lake read no
record at all (unless the job has ``allowEmpty``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pyarrow as pa
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from lakesync.config import Settings
from lakesync.errors import JobError, RequestError
from lakesync.lake import Lake
from lakesync.locations import canonical_uri
from lakesync.masking import masked
from lakesync.models import JobState, JobStatus
from lakesync.mongo import insert_new
from lakesync.operations import JobOptions, Operation
from lakesync.schema import RecordSchema

logger = logging.getLogger(__name__)

SEEN_PREFIX = "mirrorseen_"
_DONE = (JobState.COMPLETED.value, JobState.CANCELLED.value)  # failed jobs can be resumed
PAGE = 1000  # target documents compared per step of the delete phase
_LOWEST: dict[type, Any] = {str: "", int: -(2**63)}  # the first id of each key type
#: a document of another type than the keys, inserted before the first batch: the delete
#: phase refuses to run without it (a seen set that was lost would delete live documents)
_SENTINEL: dict[type, Any] = {str: -1, int: "lakesync:mirror"}

Key = str | int | float


def check_source(op: Operation, options: JobOptions, source: str, settings: Settings) -> None:
    """RequestError unless a mirror job's source is its operation's whole lake."""
    if (options.mode or op.mode) != "mirror":
        return
    whole = op.source_uri(settings)
    if canonical_uri(source) == canonical_uri(whole):
        return
    raise RequestError(
        f"A mirror deletes every document its source does not hold, so its source must be "
        f"the whole lake of operation {op.name!r} ({masked(whole)}), not "
        f"{masked(source)}: the documents of the rest of the lake would be deleted. "
        'Mirror without a "source" option, or copy part of a lake with mode full or '
        "incremental.",
        lake=masked(whole),
    )


def key_type(schema: RecordSchema, lake: Lake) -> type:
    """str or int: the type of the operation's keys; JobError if mirror cannot handle it."""
    if not isinstance(schema.key, str):
        raise JobError(
            f"Mirror mode needs a single string or integer key; this operation's key is "
            f"composite ({', '.join(schema.key)}). Use mode full.",
            key=schema.key,
        )
    rule = next((r for r in schema.fields if r.name == schema.key), None)
    declared = rule.type if rule is not None else "any"
    if declared == "any" and lake.has_column(schema.key):
        arrow_type = lake.schema.field(schema.key).type
        if pa.types.is_dictionary(arrow_type):
            arrow_type = arrow_type.value_type
        if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
            declared = "string"
        elif pa.types.is_integer(arrow_type):
            declared = "int"
    if declared == "string":
        return str
    if declared == "int":
        return int
    raise JobError(
        f"Mirror mode needs string or integer keys, but the key {schema.key!r} is {declared} "
        "here. Declare the key as a string or int field in lakesync.toml, or use mode full.",
        key=schema.key,
    )


def refusal(s: JobStatus, collection: str, allow_empty: bool) -> str | None:
    """Why mirror must not delete after this copy, or None."""
    if s.errorRecords:
        return (
            f"Mirror deletions refused: {s.errorRecords:,} records were rejected or unreadable "
            "(see copyerrors for this job), so what the lake holds is not fully known and "
            "deleting could remove documents that are still current. Fix those records and "
            "run the mirror again, or use mode full."
        )
    if s.processedRecords == 0 and not allow_empty:
        return (
            f"Mirror refused: the lake holds no records, so mirroring would delete every "
            f"document of {collection}. Check the source; to empty the collection on purpose, "
            'send the option "allowEmpty": true.'
        )
    return None


LOST = (
    "Mirror deletions refused: the keys this job read (collection mirrorseen_<jobId>) were "
    "lost, so documents that are still in the lake could be deleted. Start a new mirror copy."
)


class MirrorSet:
    """The keys one mirror job has read (a temporary collection), and the delete phase."""

    def __init__(
        self,
        db: Database[dict[str, Any]],
        target: str,
        job_id: str,
        kind: type,
        allow_empty: bool = False,
    ) -> None:
        self.seen: Collection[dict[str, Any]] = db[SEEN_PREFIX + job_id]
        self.target: Collection[dict[str, Any]] = db[target]
        self.kind = kind
        #: the job may empty the collection (its lake holds no records)
        self.allow_empty = allow_empty

    def begin(self) -> None:
        """Mark the set as started, before the job's first batch (idempotent)."""
        with contextlib.suppress(DuplicateKeyError):
            self.seen.insert_one({"_id": _SENTINEL[self.kind]})

    def intact(self) -> bool:
        """Whether the set still holds everything since ``begin`` (it was not dropped)."""
        return self.seen.find_one({"_id": _SENTINEL[self.kind]}) is not None

    def add(self, keys: list[Key]) -> None:
        """Remember the keys of a batch (the `_id`s the copy engine wrote them under)."""
        ids = list(set(keys))
        if not ids:
            return
        # keys seen before (a replayed batch, a repeated key) are kept
        insert_new(self.seen, [{"_id": i} for i in ids])

    def next_page(self, after: Key | None) -> tuple[Key, list[Key]] | None:
        """After ``after``: (last id compared, ids not in the lake), or None when done."""
        bound = {"$gt": after} if after is not None else {"$gte": _LOWEST[self.kind]}
        ids = [
            d["_id"]
            for d in self.target.find({"_id": bound}, {"_id": 1}).sort("_id", 1).limit(PAGE)
        ]
        if not ids:
            return None
        present = {d["_id"] for d in self.seen.find({"_id": {"$in": ids}}, {"_id": 1})}
        return ids[-1], [i for i in ids if i not in present]

    def delete(self, ids: list[Key]) -> int:
        """Delete these documents from the target (again, harmlessly, after a crash)."""
        if not ids:
            return 0
        return int(self.target.delete_many({"_id": {"$in": ids}}).deleted_count)


def drop_seen(db: Database[dict[str, Any]], job_id: str) -> None:
    """Remove a job's seen set, if it has one (when a job completes or is cancelled).

    A failed job keeps it: it can be resumed, and its delete phase needs every key. A
    MongoDB error is raised: the store boundary retries the drop (``Store.drop_key_set``).
    """
    db.drop_collection(SEEN_PREFIX + job_id)


def sweep(db: Database[dict[str, Any]], jobs: Collection[dict[str, Any]]) -> None:
    """Drop the seen sets of jobs that completed, were cancelled or expired. A MongoDB
    error is raised: the store boundary retries the sweep (``Store.sweep_key_sets``)."""
    for name in db.list_collection_names():
        if not name.startswith(SEEN_PREFIX):
            continue
        job_id = name[len(SEEN_PREFIX) :]
        job = jobs.find_one({"jobId": job_id}, {"status": 1})
        if job is None or job.get("status") in _DONE:
            logger.info("dropping %s: its job ended", name)
            db.drop_collection(name)
