"""URLs in messages and logs: the password never shows, the rest stays as written."""

from __future__ import annotations

import pytest

from tickwire.core.urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/2", "redis://:***@10.0.0.5:6379/2"),
        ("redis://feed:s3cret@h1:7000,h2:7001/0", "redis://feed:***@h1:7000,h2:7001/0"),
        (
            "redis+sentinel://:s3cret@s1:26379,s2:26379/prices/0",
            "redis+sentinel://:***@s1:26379,s2:26379/prices/0",
        ),
        ("unix://:s3cret@/run/redis.sock?db=3", "unix://:***@/run/redis.sock?db=3"),
        ("amqp://desk:p%40ss@rabbit:5672/md", "amqp://desk:***@rabbit:5672/md"),
        ("nats://bridge:s3cret@nats:4222", "nats://bridge:***@nats:4222"),
        ("mqtt://u:pa:ss@broker", "mqtt://u:***@broker"),
        (
            "redis+sentinel://s1,s2/tw/0?sentinel_username=app&sentinel_password=s3cret",
            "redis+sentinel://s1,s2/tw/0?sentinel_username=app&sentinel_password=***",
        ),
        (
            "redis+sentinel://:d%40ta@s1/tw?sentinel_password=s3%26cret",
            "redis+sentinel://:***@s1/tw?sentinel_password=***",
        ),
    ],
)
def test_the_password_is_starred_and_nothing_else_changes(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://feed@10.0.0.5/0",  # a user without a password
        "amqp://rabbit/",
        "not a url",
        "",
        "redis://[::1/0",  # unparseable: as it is
        "redis+sentinel://s1/tw/0?sentinel_username=app",
    ],
)
def test_a_url_without_a_password_is_left_as_it_is(url: str) -> None:
    assert redact_url(url) == url
