"""Controller logic over a fake engine: naming, sizes, idempotency, pagination, capacity."""

from __future__ import annotations

import dataclasses

import pytest

from csi_thin import deadline, errors, model
from csi_thin.controller import naming, paging, provisioner
from csi_thin.pool import health
from tests.unit import fake_engine

MiB = model.MiB
GiB = model.GiB
BS = 64 * 1024
DL = deadline.Deadline.after(60)


def make(**kw: object) -> tuple[provisioner.Provisioner, fake_engine.FakeEngine]:
    eng = fake_engine.FakeEngine()
    settings = provisioner.Settings(node_id="n1", block_size=BS, **kw)  # type: ignore[arg-type]
    return provisioner.Provisioner(engine=eng, settings=settings), eng


def req(name: str, required: int = 0, limit: int = 0, **kw: object) -> provisioner.VolumeRequest:
    return provisioner.VolumeRequest(name=name, capacity=provisioner.CapacityRange(required, limit), **kw)  # type: ignore[arg-type]


# -- naming ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("pvc-0f1e", "v-pvc-0f1e"), ("a", "v-a"), ("a" * 63, "v-" + "a" * 63)],
)
def test_readable_names(name: str, expected: str) -> None:
    assert naming.device_name(name, naming.IdKind.VOLUME) == expected


@pytest.mark.parametrize("name", ["Upper", "with space", "a" * 64, "-lead", "trail-", "ü", "x" * 128, "a.b"])
def test_hashed_names_are_bounded_safe_and_deterministic(name: str) -> None:
    got = naming.device_name(name, naming.IdKind.SNAPSHOT)
    assert got.startswith("sh-") and len(got) == 43
    assert got == naming.device_name(name, naming.IdKind.SNAPSHOT)
    assert naming.is_own_id(got, naming.IdKind.SNAPSHOT)
    assert not naming.is_own_id(got, naming.IdKind.VOLUME)


def test_forms_and_kinds_do_not_collide() -> None:
    readable = naming.device_name("h-abc", naming.IdKind.VOLUME)
    hashed = naming.device_name("H-abc", naming.IdKind.VOLUME)
    assert readable == "v-h-abc" and hashed.startswith("vh-") and readable != hashed
    assert naming.device_name("x", naming.IdKind.VOLUME) != naming.device_name("x", naming.IdKind.SNAPSHOT)


def test_group_ids_and_member_names() -> None:
    group = naming.device_name("db-group", naming.IdKind.GROUP)
    assert group == "g-db-group" and naming.is_own_id(group, naming.IdKind.GROUP)
    assert not naming.is_own_id(group, naming.IdKind.SNAPSHOT)
    member = naming.group_member_name(group, "v-data")
    assert member.startswith("sh-") and naming.is_own_id(member, naming.IdKind.SNAPSHOT)
    assert member == naming.group_member_name(group, "v-data") != naming.group_member_name(group, "v-wal")
    # no CSI name (control characters are refused at the edge) maps onto a member's name
    assert member != naming.device_name(f"{group}-v-data", naming.IdKind.SNAPSHOT)


@pytest.mark.parametrize("value", ["some-vol-id", "v-", "v-UP", "x-abc", "vh-", "s-abc/../x", ""])
def test_foreign_ids(value: str) -> None:
    assert not naming.is_own_id(value, naming.IdKind.VOLUME)


# -- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("required", "limit", "at_least", "expected"),
    [
        (0, 0, 0, GiB),  # default size
        (1, 0, 0, BS),  # rounded up to the block size
        (BS + 1, 0, 0, 2 * BS),
        (0, 10 * MiB, 0, 10 * MiB),  # the default capped by the limit
        (1, BS + 100, 0, BS),
        (10 * MiB, 0, 20 * MiB, 20 * MiB),  # a clone is never smaller than its source
        (10 * MiB, 30 * MiB, 20 * MiB, 20 * MiB),
    ],
)
def test_choose_size(required: int, limit: int, at_least: int, expected: int) -> None:
    settings = provisioner.Settings(node_id="n", block_size=BS)
    got = provisioner.choose_size(provisioner.CapacityRange(required, limit), settings, at_least=at_least)
    assert got == expected


@pytest.mark.parametrize(
    ("required", "limit", "at_least", "error"),
    [
        (-1, 0, 0, errors.InvalidArgument),
        (0, -1, 0, errors.InvalidArgument),
        (10, 5, 0, errors.InvalidArgument),
        (1 << 62, 0, 0, errors.OutOfRange),  # above the driver maximum
        (100, 200, 0, errors.OutOfRange),  # no block multiple fits
        (10 * MiB, 15 * MiB, 20 * MiB, errors.OutOfRange),  # source larger than the limit
    ],
)
def test_choose_size_rejects(required: int, limit: int, at_least: int, error: type[Exception]) -> None:
    settings = provisioner.Settings(node_id="n", block_size=BS)
    with pytest.raises(error):
        provisioner.choose_size(provisioner.CapacityRange(required, limit), settings, at_least=at_least)


# -- create / idempotency ------------------------------------------------------------------------------


def test_create_is_idempotent_and_checks_compatibility() -> None:
    prov, _ = make()
    a = prov.create_volume(req("pvc-a", 10 * MiB), deadline=DL)
    assert prov.create_volume(req("pvc-a", 10 * MiB), deadline=DL) == a
    assert prov.create_volume(req("pvc-a", 5 * MiB, 20 * MiB), deadline=DL) == a  # fits the range
    with pytest.raises(errors.AlreadyExists):
        prov.create_volume(req("pvc-a", 20 * MiB), deadline=DL)
    src = provisioner.ContentSource(naming.IdKind.VOLUME, a.name)
    with pytest.raises(errors.AlreadyExists):
        prov.create_volume(req("pvc-a", 10 * MiB, source=src), deadline=DL)


def test_clone_and_restore_into_larger() -> None:
    prov, _ = make()
    a = prov.create_volume(req("pvc-a", 10 * MiB), deadline=DL)
    snap = prov.create_snapshot("snap-1", a.name, deadline=DL)
    assert prov.create_snapshot("snap-1", a.name, deadline=DL) == snap
    r = prov.create_volume(
        req("pvc-r", 30 * MiB, source=provisioner.ContentSource(naming.IdKind.SNAPSHOT, snap.name)),
        deadline=DL,
    )
    assert (r.size_bytes, r.origin) == (30 * MiB, snap.name)
    c = prov.create_volume(
        req("pvc-c", source=provisioner.ContentSource(naming.IdKind.VOLUME, a.name)), deadline=DL
    )
    assert c.size_bytes == GiB  # default size, larger than the source
    small = prov.create_volume(
        req("pvc-s", 1, source=provisioner.ContentSource(naming.IdKind.VOLUME, a.name)), deadline=DL
    )
    assert small.size_bytes == 10 * MiB  # raised to the source's size


def test_missing_and_foreign_sources_are_not_found() -> None:
    prov, _ = make()
    for kind, ident in [
        (naming.IdKind.SNAPSHOT, "s-nope"),
        (naming.IdKind.SNAPSHOT, "foreign-id"),
        (naming.IdKind.VOLUME, "v-nope"),
    ]:
        with pytest.raises(errors.NotFound):
            prov.create_volume(req("pvc-x", source=provisioner.ContentSource(kind, ident)), deadline=DL)
    with pytest.raises(errors.NotFound):
        prov.create_snapshot("s", "v-nope", deadline=DL)


def test_snapshot_name_reused_for_another_source() -> None:
    prov, _ = make()
    a = prov.create_volume(req("pvc-a"), deadline=DL)
    b = prov.create_volume(req("pvc-b"), deadline=DL)
    prov.create_snapshot("snap", a.name, deadline=DL)
    with pytest.raises(errors.AlreadyExists):
        prov.create_snapshot("snap", b.name, deadline=DL)


def test_topology_requirement() -> None:
    prov, eng = make()
    with pytest.raises(errors.ResourceExhausted):
        prov.create_volume(req("pvc-a", allowed_nodes=frozenset({"other"})), deadline=DL)
    assert not eng.devices
    assert prov.create_volume(req("pvc-a", allowed_nodes=frozenset({"n1", "other"})), deadline=DL)


def test_overprovision_limit() -> None:
    prov, eng = make(overprovision_ratio=2.0)  # 10 GiB pool: 20 GiB may be provisioned
    prov.create_volume(req("pvc-a", 15 * GiB), deadline=DL)
    with pytest.raises(errors.ResourceExhausted):
        prov.create_volume(req("pvc-b", 6 * GiB), deadline=DL)
    prov.create_volume(req("pvc-b", 5 * GiB), deadline=DL)
    assert len(eng.devices) == 2


def test_delete_absent_foreign_and_wrong_kind_ids_are_done() -> None:
    prov, eng = make()
    a = prov.create_volume(req("pvc-a"), deadline=DL)
    prov.delete_volume("v-absent", deadline=DL)
    prov.delete_volume("reallyfakevolumeid", deadline=DL)
    prov.delete_snapshot(a.name, deadline=DL)  # a volume id is not a snapshot id
    assert a.name in eng.devices
    prov.delete_volume(a.name, deadline=DL)
    prov.delete_volume(a.name, deadline=DL)
    assert not eng.devices


def test_expand() -> None:
    prov, _ = make()
    a = prov.create_volume(req("pvc-a", 10 * MiB), deadline=DL)
    grown = prov.expand_volume(a.name, provisioner.CapacityRange(20 * MiB + 1), deadline=DL)
    assert grown.size_bytes == 20 * MiB + BS
    assert prov.expand_volume(a.name, provisioner.CapacityRange(5 * MiB), deadline=DL) == grown  # no shrink
    with pytest.raises(errors.NotFound):
        prov.expand_volume("v-nope", provisioner.CapacityRange(5 * MiB), deadline=DL)


def test_busy_names_give_operation_pending() -> None:
    prov, eng = make()
    eng.busy.add("v-pvc-a")
    with pytest.raises(errors.OperationPending):
        prov.create_volume(req("pvc-a"), deadline=DL)


# -- listing -----------------------------------------------------------------------------------------


def test_tokens_round_trip_and_reject_foreign() -> None:
    assert paging.start_after(paging.token_after("v-abc")) == "v-abc"
    for bad in ["", "invalid-token", "c1.", "c1.%%%", "c2.djEtYWJj", "c1.////"]:
        assert paging.start_after(bad) is None


def test_pagination_is_stable_across_inserts_and_deletes() -> None:
    prov, eng = make()
    for n in "aebdc":
        prov.create_volume(req(f"pvc-{n}"), deadline=DL)
    first = prov.list_volumes(max_entries=2, token="")
    assert [d.name for d in first.devices] == ["v-pvc-a", "v-pvc-b"] and first.next_token
    eng.devices.pop("v-pvc-b")  # the last volume of the page goes away
    prov.create_volume(req("pvc-0"), deadline=DL)  # one sorts before the cursor, one after
    prov.create_volume(req("pvc-cc"), deadline=DL)
    second = prov.list_volumes(max_entries=2, token=first.next_token)
    assert [d.name for d in second.devices] == ["v-pvc-c", "v-pvc-cc"]
    third = prov.list_volumes(max_entries=2, token=second.next_token)
    assert [d.name for d in third.devices] == ["v-pvc-d", "v-pvc-e"] and third.next_token == ""
    assert len(prov.list_volumes(max_entries=0, token="").devices) == 6
    with pytest.raises(provisioner.InvalidToken):
        prov.list_volumes(max_entries=2, token="invalid-token")


def test_list_snapshots_filters() -> None:
    prov, _ = make()
    a = prov.create_volume(req("pvc-a"), deadline=DL)
    b = prov.create_volume(req("pvc-b"), deadline=DL)
    sa = prov.create_snapshot("sa", a.name, deadline=DL)
    prov.create_snapshot("sb", b.name, deadline=DL)
    assert [
        s.name
        for s in prov.list_snapshots(snapshot_id=sa.name, source_id="", max_entries=0, token="").devices
    ] == [sa.name]
    assert [
        s.name for s in prov.list_snapshots(snapshot_id="", source_id=a.name, max_entries=0, token="").devices
    ] == [sa.name]
    assert prov.list_snapshots(snapshot_id="s-none", source_id="", max_entries=0, token="").devices == []
    assert len(prov.list_snapshots(snapshot_id="", source_id="", max_entries=0, token="").devices) == 2


# -- capacity and condition ----------------------------------------------------------------------------


def test_capacity() -> None:
    prov, eng = make(overprovision_ratio=2.0)
    eng.data_used = 1 * GiB
    cap = prov.capacity(node_id=None, deadline=DL)
    # logical: 2 x 10 GiB - 0 provisioned; physical: 10 GiB x 0.95 - 1 GiB
    assert cap.maximum_volume_bytes == 20 * GiB
    assert cap.available_bytes == (int(10 * GiB * 0.95) - GiB) // BS * BS
    prov.create_volume(req("pvc-a", 15 * GiB), deadline=DL)
    cap = prov.capacity(node_id="n1", deadline=DL)
    assert cap.maximum_volume_bytes == cap.available_bytes == 5 * GiB
    assert prov.capacity(node_id="elsewhere", deadline=DL).available_bytes == 0
    eng.mode = model.PoolMode.RO
    assert prov.capacity(node_id=None, deadline=DL) == provisioner.Capacity(0, 0)


def test_no_capacity_above_a_threshold() -> None:
    """Above a threshold the engine refuses every new volume. The Kubernetes scheduler prefers
    maximum_volume_size over available_capacity when both are set, so it must drop to 0 too, or
    pods keep being placed on a node that cannot provision for them."""
    prov, eng = make()
    eng.data_used = int(9.6 * GiB)  # above the 95% data threshold
    assert prov.capacity(node_id=None, deadline=DL) == provisioner.Capacity(0, 0)
    eng.data_used, eng.metadata_used = 0, 90  # above the 80% metadata threshold
    assert prov.capacity(node_id=None, deadline=DL) == provisioner.Capacity(0, 0)
    eng.metadata_used = 1
    assert prov.capacity(node_id=None, deadline=DL).maximum_volume_bytes > 0


def test_capacity_and_health_use_the_pools_own_thresholds() -> None:
    """In Kubernetes mode one controller serves nodes configured with different thresholds: the
    capacity it reports (and the volume health) must follow each pool's own, or a node with a
    lower threshold is offered volumes its engine then refuses."""
    prov, eng = make()
    a = prov.create_volume(req("pvc-a"), deadline=DL)
    eng.thresholds = model.Thresholds(data=0.5, metadata=0.8)
    eng.data_used = 6 * GiB  # 60%: below the default 95%, above this pool's 50%
    assert prov.capacity(node_id=None, deadline=DL) == provisioner.Capacity(0, 0)
    got = prov.volume_health(a.name, deadline=DL)
    assert [i.reason for i in got.issues] == [health.DATA_ABOVE_THRESHOLD] and got.volume == a
    assert "50% threshold" in got.issues[0].message
    eng.data_used = 4 * GiB
    cap = prov.capacity(node_id=None, deadline=DL)
    assert cap.available_bytes == (int(10 * GiB * 0.5) - 4 * GiB) // BS * BS
    assert prov.volume_health(a.name, deadline=DL).issues == ()


@pytest.mark.parametrize(
    ("mode", "used", "needs_check", "reasons"),
    [
        (model.PoolMode.RW, 0, False, []),
        (model.PoolMode.RW, int(9.6 * GiB), False, [health.DATA_ABOVE_THRESHOLD]),
        (model.PoolMode.RO, 0, False, [health.READ_ONLY]),
        (model.PoolMode.RW, 0, True, [health.NEEDS_CHECK]),
        (model.PoolMode.OUT_OF_DATA_SPACE, 10 * GiB, False, [health.OUT_OF_DATA_SPACE]),
        (model.PoolMode.FAIL, 0, False, [health.FAILED]),
    ],
)
def test_volume_health(mode: model.PoolMode, used: int, needs_check: bool, reasons: list[str]) -> None:
    prov, eng = make()
    a = prov.create_volume(req("pvc-a"), deadline=DL)
    eng.mode, eng.data_used, eng.needs_check = mode, used, needs_check
    assert [i.reason for i in prov.volume_health(a.name, deadline=DL).issues] == reasons


def test_volume_health_of_a_lost_or_unknown_volume() -> None:
    prov, eng = make()
    a = prov.create_volume(req("pvc-a"), deadline=DL)
    eng.devices[a.name] = dataclasses.replace(a, state=model.DeviceState.LOST)
    got = prov.volume_health(a.name, deadline=DL)
    assert [(i.severity, i.reason) for i in got.issues] == [(health.Severity.DATA_LOSS, health.DEVICE_LOST)]
    with pytest.raises(errors.NotFound):
        prov.volume_health("v-ghost", deadline=DL)


def test_list_volume_health_lists_the_unhealthy_in_pages() -> None:
    """Only volumes with an issue are listed (the spec's "abnormal volume health entries"), paged by
    name like ListVolumes, each entry with its own issues."""
    prov, eng = make()
    for n in "abcdef":
        prov.create_volume(req(f"pvc-{n}"), deadline=DL)
    assert prov.list_volume_health(max_entries=0, token="", deadline=DL) == provisioner.HealthPage([], "")
    for n in "bdf":
        eng.devices[f"v-pvc-{n}"] = dataclasses.replace(
            eng.devices[f"v-pvc-{n}"], state=model.DeviceState.LOST
        )
    first = prov.list_volume_health(max_entries=2, token="", deadline=DL)
    assert [h.volume.name for h in first.entries] == ["v-pvc-b", "v-pvc-d"] and first.next_token
    second = prov.list_volume_health(max_entries=2, token=first.next_token, deadline=DL)
    assert [h.volume.name for h in second.entries] == ["v-pvc-f"] and second.next_token == ""
    assert all(h.issues[0].reason == health.DEVICE_LOST for h in first.entries + second.entries)
    # a pool issue makes every volume unhealthy; the lost ones carry both
    eng.mode = model.PoolMode.RO
    every = prov.list_volume_health(max_entries=0, token="", deadline=DL)
    assert [h.volume.name for h in every.entries] == [f"v-pvc-{n}" for n in "abcdef"]
    assert [i.reason for i in every.entries[1].issues] == [health.DEVICE_LOST, health.READ_ONLY]
    with pytest.raises(provisioner.InvalidToken):
        prov.list_volume_health(max_entries=2, token="invalid-token", deadline=DL)


class _NoScanEngine(fake_engine.FakeEngine):
    """An engine on which reading every device is an error: what must cost the same at any pool
    size reads running totals and pages instead (issue 12)."""

    def list(self, *, kind: model.DeviceKind | None = None) -> list[model.Device]:
        raise AssertionError("listed every device")


def test_create_capacity_and_list_volumes_read_no_list_of_every_device() -> None:
    eng = _NoScanEngine()
    prov = provisioner.Provisioner(engine=eng, settings=provisioner.Settings(node_id="n1", block_size=BS))
    for name in ("pvc-a", "pvc-b", "pvc-c"):
        prov.create_volume(req(name, GiB), deadline=DL)
    cap = prov.capacity(node_id="n1", deadline=DL)
    assert cap.maximum_volume_bytes == 10 * 10 * GiB - 3 * GiB
    first = prov.list_volumes(max_entries=2, token="")
    second = prov.list_volumes(max_entries=2, token=first.next_token)
    assert [d.name for d in first.devices + second.devices] == ["v-pvc-a", "v-pvc-b", "v-pvc-c"]
    assert second.next_token == ""
    assert [d.name for d in prov.list_volumes(max_entries=0, token="").devices] == [
        "v-pvc-a",
        "v-pvc-b",
        "v-pvc-c",
    ]
