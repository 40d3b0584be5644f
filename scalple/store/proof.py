"""Inclusion proofs: one record, shown to be in a signed tree, checkable alone.

A proof carries the record's stored bytes, its leaf index, the audit path
and the signed checkpoint; ``check_proof`` needs nothing else but the log's
public key.  docs/verifying.md walks through the same steps for auditors who
want to check a proof with their own code.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import msgspec

from scalple.records import decode_record, record_dict
from scalple.store import layout
from scalple.store.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from scalple.store.hashing import leaf_hash
from scalple.store.keys import VerifierKey
from scalple.store.merkle import CompactRange, LeafNodes, inclusion_proof, verify_inclusion
from scalple.store.segment import SegmentError, read_header, scan_frames

__all__ = ["InclusionProof", "ProofError", "check_proof", "prove"]

_LOG_ID_PREFIX = "immutable-"


class ProofError(Exception):
    """No proof can be made, or a proof does not hold; the message says why."""


class InclusionProof(msgspec.Struct, kw_only=True):
    """The JSON document ``scalple prove`` prints."""

    log_id: str
    origin: str
    hash: str  # the tree's hash function
    leaf_index: int  # 0-based position of the record in the tree
    tree_size: int  # size of the signed tree the path leads to
    record: str  # base64 of the record's stored bytes (what the leaf hashes)
    leaf_hash: str  # hex blake3(0x00 || record)
    audit_path: list[str]  # hex sibling hashes, leaf level first
    checkpoint: str  # the signed checkpoint (C2SP signed note)


def prove(log_dir: Path, log_id: str, verifiers: Sequence[VerifierKey]) -> InclusionProof:
    """The proof that the record ``log_id`` is in its origin's newest signed tree."""
    prefix = log_id.removeprefix(_LOG_ID_PREFIX).lower()
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise ProofError(f"{log_id!r} is not a log id (immutable- and at least 8 hex digits)")
    for directory in layout.origin_dirs(log_dir):
        found = _prove_in(directory, prefix, verifiers)
        if found is not None:
            return found
    raise ProofError(f"no record {log_id} in {log_dir}")


def _prove_in(
    directory: Path, prefix: str, verifiers: Sequence[VerifierKey]
) -> InclusionProof | None:
    note = (directory / layout.CHECKPOINT_FILE).read_bytes()
    numbers = layout.segment_numbers(directory)
    leaves: list[bytes] = []
    base: CompactRange | None = None
    target: tuple[int, bytes, bytes] | None = None  # index, payload, digest
    for number in numbers:
        path = layout.segment_path(directory, number)
        data = path.read_bytes()
        try:
            header, start = read_header(data, path)
        except SegmentError as exc:
            raise ProofError(str(exc)) from None
        if base is None:
            try:
                base = CompactRange(header.first_index, header.start_hashes)
            except ValueError as exc:
                raise ProofError(f"{path}: impossible header start: {exc}") from None
        for item in scan_frames(data, start):
            if not item.intact:
                raise ProofError(
                    f"{path}: damaged record at byte {item.offset}; run scalple verify"
                )
            if target is None and item.digest.hex().startswith(prefix):
                target = (base.size + len(leaves), item.payload, item.digest)
            leaves.append(item.digest)
    if target is None or base is None:
        return None
    try:
        checkpoint = open_checkpoint(note, verifiers)
    except CheckpointError as exc:
        raise ProofError(f"the newest checkpoint does not verify: {exc}") from None
    index, payload, digest = target
    if index >= checkpoint.size:
        raise ProofError(
            f"record {index} is not signed yet (newest checkpoint: {checkpoint.size} records); "
            "try again in a second"
        )
    nodes = LeafNodes(leaves, base.size, base)
    audit_path = inclusion_proof(index, checkpoint.size, nodes)
    return InclusionProof(
        log_id=_LOG_ID_PREFIX + digest.hex()[:16],
        origin=checkpoint.origin,
        hash="blake3",
        leaf_index=index,
        tree_size=checkpoint.size,
        record=base64.b64encode(payload).decode("ascii"),
        leaf_hash=digest.hex(),
        audit_path=[node.hex() for node in audit_path],
        checkpoint=note.decode("utf-8"),
    )


def check_proof(proof: InclusionProof, verifiers: Sequence[VerifierKey]) -> dict[str, object]:
    """Check a proof from scratch; returns the record it proves."""
    try:
        checkpoint: Checkpoint = open_checkpoint(proof.checkpoint.encode("utf-8"), verifiers)
    except CheckpointError as exc:
        raise ProofError(f"the checkpoint does not verify: {exc}") from None
    if checkpoint.size != proof.tree_size:
        raise ProofError(f"tree_size {proof.tree_size} but the checkpoint signs {checkpoint.size}")
    try:
        payload = base64.b64decode(proof.record, validate=True)
        path = [bytes.fromhex(node) for node in proof.audit_path]
    except ValueError as exc:
        raise ProofError(f"malformed proof: {exc}") from None
    digest = leaf_hash(payload)
    if digest.hex() != proof.leaf_hash:
        raise ProofError("the record's bytes do not hash to leaf_hash")
    if not verify_inclusion(digest, proof.leaf_index, checkpoint.size, path, checkpoint.root):
        raise ProofError("the audit path does not lead to the checkpoint's root")
    # What the proof claims beside the path is shown to the auditor: it must be true too.
    log_id = _LOG_ID_PREFIX + digest.hex()[:16]
    if proof.log_id != log_id:
        raise ProofError(f"log_id {proof.log_id} is not the proved record's id {log_id}")
    if proof.origin != checkpoint.origin:
        raise ProofError(f"origin {proof.origin!r} but the checkpoint is for {checkpoint.origin!r}")
    record = decode_record(payload)
    record.log_id = log_id
    return record_dict(record)
