"""Power loss at random moments, for every sync policy (issue 6 requirement 2, DESIGN §5).

The store runs on a :class:`PowerLossFileLayer` that also cuts the power *at the k-th
file operation* (k drawn at random), wherever the store is: inside an append, a
rollover, a sidecar write, a checkpoint, a retention, a sync. From the cut on, every
file operation fails (the machine is off). Then the files go back to what was durable
(``power_loss``), optionally keeping a random part of what had been written but not
yet fsynced (a kernel may have written some dirty pages back): the worst cases for
recovery are torn frames, torn spine hashes and torn checkpoint lines.

After reopening: the store opens as a writer and verifies (so no torn frame sits
before a good one); the records are exactly a contiguous run of the appended ones (a
prefix of the appends, minus what retention removed), byte for byte; ``always`` lost
no record whose ``append`` returned; ``every:N`` and ``group:N:MS`` lost fewer than N;
and under every policy nothing is lost that a returned ``sync()``, ``checkpoint()`` or
``apply_retention()`` had made durable.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from quipu_logging import AuditStore, RetentionPolicy, StoreConfig
from quipu_logging.store import PowerLossFileLayer

POLICIES = {"always": 1, "every:5": 5, "group:8:5": 8, "os": None}
TRIALS = 50


class PowerCut(BaseException):
    """The power went off (a BaseException, so no ``except Exception`` in the store swallows it)."""


class CuttingLayer(PowerLossFileLayer):
    """A PowerLossFileLayer whose power goes off at the ``cut_at``-th file operation."""

    def __init__(self, cut_at: int) -> None:
        super().__init__()
        self.ops = 0
        self.cut_at = cut_at
        self.dead = False

    def _tick(self) -> None:
        if self.dead:
            raise PowerCut
        self.ops += 1
        if self.ops == self.cut_at:
            self.dead = True
            raise PowerCut

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            self._tick()
        return super().open(path, flags, mode)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self._tick()
        super().pwrite(fd, data, offset)

    def truncate(self, fd: int, length: int) -> None:
        self._tick()
        super().truncate(fd, length)

    def fsync(self, fd: int) -> None:
        self._tick()
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        self._tick()
        super().fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self._tick()
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._tick()
        super().unlink(path)

    def writeback_some(self, rng: random.Random) -> None:
        """Before the power loss: make a random prefix of each file's unsynced appended bytes durable."""
        with self._lock:
            for path, durable in list(self._durable.items()):
                if not self._entry_durable.get(path) or not os.path.exists(path):
                    continue
                with open(path, "rb") as f:
                    now = f.read()
                if len(now) > len(durable) and now.startswith(durable) and rng.random() < 0.7:
                    self._durable[path] = now[: rng.randint(len(durable), len(now))]


def event(i: int, rng: random.Random) -> dict[str, Any]:
    return {"i": i, "pad": "x" * rng.randrange(0, 120)}


def run_trial(root: Path, policy: str, seed: int, *, writeback: bool) -> None:
    rng = random.Random(seed)
    layer = CuttingLayer(cut_at=rng.randint(1, 300))
    retention = RetentionPolicy(max_bytes=3000) if rng.random() < 0.4 else None
    config = StoreConfig(
        root=root,
        sync=policy,
        max_segment_bytes=rng.choice([600, 1200, 1 << 20]),
        retention=retention,
        file_layer=layer,
    )
    appended: list[bytes] = []  # leaf hashes of the appends that returned, in order
    durable = 0  # how many of them a returned sync/checkpoint/retention made durable
    returned = 0  # appends that returned
    store = None
    try:
        store = AuditStore.open(config)
        for _ in range(400):
            action = rng.random()
            if action < 0.6:
                receipt = store.append(event(len(appended), rng))
                appended.append(receipt.leaf_hash)
            elif action < 0.8:
                receipts = store.append_batch(
                    [event(len(appended) + k, rng) for k in range(rng.randint(1, 6))]
                )
                appended.extend(r.leaf_hash for r in receipts)
            elif action < 0.88:
                store.sync()
                durable = len(appended)
            elif action < 0.94:
                store.checkpoint()
                durable = len(appended)
            elif store.apply_retention():
                durable = len(appended)  # it removed segments: a checkpoint was written first
            returned = len(appended)
        pytest.fail(f"the power never went off (cut_at={layer.cut_at}, ops={layer.ops})")
    except PowerCut:
        pass
    if store is not None:
        store._release_all()  # the process is gone with the power: drop descriptors and lock
    layer.forget_descriptors()
    if writeback:
        layer.writeback_some(rng)
    layer.power_loss()

    where = f"policy={policy} seed={seed} writeback={writeback} cut_at={layer.cut_at}"
    with AuditStore.open(StoreConfig(root=root, sync=policy)) as reopened:
        report = reopened.verify()
        assert report.ok, f"{where}: {report.problems}"
        records = list(reopened.scan())
    user = [r for r in records if "$sys" not in r.payload]
    if not user:
        survivors_end = 0
    else:
        first_i = user[0].payload["i"]
        got = [r.payload["i"] for r in user]
        assert got == list(range(first_i, first_i + len(got))), f"{where}: not a contiguous run: {got[:20]}"
        # byte for byte: each survivor is the very record that was appended (its leaf hash)
        for r in user:
            if r.payload["i"] < len(appended):
                assert r.leaf_hash == appended[r.payload["i"]], f"{where}: record {r.payload['i']} differs"
        survivors_end = first_i + len(got)
        assert first_i == 0 or retention is not None, f"{where}: records before {first_i} vanished"
    # A record whose append never returned may survive (it was written when the power went).
    assert survivors_end <= returned + 8, where
    assert survivors_end >= durable, f"{where}: lost records a returned sync/checkpoint made durable"
    bound = POLICIES[policy]
    if bound is not None:
        assert survivors_end >= returned - (bound - 1), (
            f"{where}: {returned - survivors_end} appended records lost, the policy allows {bound - 1}"
        )


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("writeback", [False, True], ids=["drop-all-unsynced", "partial-writeback"])
def test_power_cut_at_random_operation(tmp_path: Path, policy: str, writeback: bool) -> None:
    """Power cut at a random file operation: reopens, verifies, loses no more than the policy promises."""
    for trial in range(TRIALS):
        seed = trial * 7919 + len(policy) * 101 + writeback
        run_trial(tmp_path / f"t{trial}", policy, seed, writeback=writeback)
