"""The services table of the local stack and the settings it runs with, checked without starting anything."""

import dataclasses

import pytest

from infra.local import services, state


def test_a_seaweedfs_port_without_room_for_its_grpc_twin_is_refused_before_starting():
    with pytest.raises(state.StackError, match=r"seaweedfs: port\(s\) \[69333\] are outside 1-65535"):
        services.StackConfig(s3_port=59333)


def test_every_port_setting_belongs_to_exactly_one_service():
    fields = [f.name for f in dataclasses.fields(services.StackConfig) if f.name.endswith("_port")]
    config = services.StackConfig(**{name: 20000 + 10 * i for i, name in enumerate(fields)})
    owners = {
        name: [s.name for s in services.SERVICES if getattr(config, name) in s.ports(config)]
        for name in fields
    }
    assert all(len(found) == 1 for found in owners.values()), owners
    assert [s.name for s in services.SERVICES] == ["seaweedfs", "mlflow", "ray"]  # the start order
