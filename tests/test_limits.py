"""The descriptor budget: how far the open-files limit is raised and how many clients it holds."""

from __future__ import annotations

import pytest

from twisted_gateway.limits import (
    OWN_FILES,
    UNLIMITED_CEILING,
    ClientLimits,
    OpenFilesPlan,
    client_limits,
    fallback,
    plan_open_files,
    refusal_room,
    reserved_files,
    websocket_room,
)

INFINITY = -1  # resource.RLIM_INFINITY on Linux


@pytest.mark.parametrize(
    "soft, hard, wanted, plan",
    [
        # systemd's and the shells' default: the soft limit goes up to the hard one
        (1024, 20000, None, OpenFilesPlan(20000, 20000)),
        (1024, 524288, None, OpenFilesPlan(524288, 524288)),
        # already at the hard limit: unchanged
        (20000, 20000, None, OpenFilesPlan(20000, 20000)),
        # max_open_files below the hard limit is granted as asked (even below the soft one)
        (1024, 20000, 8192, OpenFilesPlan(8192, 20000)),
        (4096, 20000, 2048, OpenFilesPlan(2048, 20000)),
        # above the hard limit: ask for both (takes privileges)
        (1024, 4096, 65536, OpenFilesPlan(65536, 65536)),
        # no hard limit: the kernel's own ceiling, not "infinity" (which Linux refuses)
        (1024, INFINITY, None, OpenFilesPlan(UNLIMITED_CEILING, INFINITY)),
        (1024, INFINITY, 100000, OpenFilesPlan(100000, INFINITY)),
    ],
)
def test_the_soft_open_files_limit_is_raised_to_the_hard_one_or_max_open_files(soft, hard, wanted, plan):
    assert plan_open_files(soft, hard, wanted, INFINITY) == plan


def test_a_refused_max_open_files_falls_back_to_the_hard_limit_with_a_reason():
    plan = plan_open_files(1024, 4096, 65536, INFINITY)
    second = fallback(plan, 4096, INFINITY)
    assert (second.soft, second.hard) == (4096, 4096)
    assert "65536" in second.note and "4096" in second.note


@pytest.mark.parametrize(
    "keepalive, instances, reserved",
    [(32, 1, OWN_FILES + 32), (32, 3, OWN_FILES + 96), (8, 0, OWN_FILES + 8)],
)
def test_the_gateways_own_files_and_its_keepalive_pool_are_kept_out_of_the_client_budget(
    keepalive, instances, reserved
):
    assert reserved_files(keepalive, instances) == reserved


@pytest.mark.parametrize(
    "open_files, reserved, room",
    [
        (1024, 96, (928 - 58) // 2),  # 435: about what the issue saw fail at 454
        (20000, 96, (19904 - 256) // 2),
        (300, 96, (204 - 12) // 2),
        (100, 96, 1),  # never zero: one client can still be served
    ],
)
def test_each_client_connection_is_budgeted_two_descriptors(open_files, reserved, room):
    assert websocket_room(open_files, reserved) == room


@pytest.mark.parametrize("budget, room", [(0, 8), (204, 12), (4096, 256), (10**6, 256)])
def test_a_few_refusals_can_be_answered_past_the_cap(budget, room):
    assert refusal_room(budget) == room


@pytest.mark.parametrize(
    "setting, open_files, reserved, limits",
    [
        ("auto", 20000, 96, ClientLimits(9824, 256)),
        ("auto", 300, 96, ClientLimits(96, 12)),
        (500, 20000, 96, ClientLimits(500, 62)),
        (10, 300, 96, ClientLimits(10, 8)),
    ],
)
def test_max_client_connections_auto_is_what_the_descriptors_allow(setting, open_files, reserved, limits):
    assert client_limits(setting, open_files, reserved) == limits


def test_auto_never_lets_the_clients_and_their_upstream_legs_exhaust_the_descriptors():
    for open_files in (256, 300, 1024, 4096, 20000, 65536):
        reserved = reserved_files(32, 2)
        limits = client_limits("auto", open_files, reserved)
        if open_files > reserved + 2 * limits.cap:
            assert reserved + 2 * limits.cap + limits.refusals <= open_files
